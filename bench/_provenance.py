"""Which code a result comes from: the commit, for every results file of the GPU scripts."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """HEAD's short hash (+ "-dirty" with uncommitted changes to tracked files); without a git
    checkout (a copied tree, as on the GPU machine) $GSAE_FAST_COMMIT, else "unknown"."""
    def git(*a):
        r = subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = head and git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git
        head = dirty = None
    if head:
        return head + ("-dirty" if dirty else "")
    return os.environ.get("GSAE_FAST_COMMIT") or "unknown"
