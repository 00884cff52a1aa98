"""What every benchmark script shares: the timing, the peak resident memory of a call, where a
result comes from (commit, date, versions) and the markdown + JSON pair it is written to.

No torch at import: bench/gpu_check.py imports this module in a process that must not load it.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


# ------------------------------------------------------------------------------------ timing

def timeit(fn, repeats, warmup=2):
    """Median wall time (ms) of `repeats` calls of fn() after `warmup` untimed ones. Where CUDA
    is in use the device is synchronised around each timed call, so that the time covers the
    kernels and not only their launch; a CPU-only process never starts CUDA for it."""
    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


# ------------------------------------------------------------------------------------ memory
# Linux /proc; run each measured call in a fresh process, so that the peak is that call's.

def rss_kb(field: str) -> int:
    """A /proc/self/status field in kB: "VmRSS:" (now) or "VmHWM:" (the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> None:
    """Reset the peak (VmHWM) to the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -------------------------------------------------------------------------------- provenance

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


def stamp(minutes: bool = True) -> str:
    """Now as "YYYY-MM-DD HH:MM", or the day alone (each results file keeps the form it has)."""
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M" if minutes else "%Y-%m-%d")


def cpu_name() -> str:
    """The processor's name, or the architecture where the platform does not report one."""
    return platform.processor() or platform.machine()


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


# ---------------------------------------------------------------------------------- results

def md_table(cols, rows, align=None) -> list:
    """The lines of a markdown table: a header of `cols`, then one line per row of cells
    (formatted by the caller); `align`: one separator per column ("---", "---:"), else "---"."""
    def line(cells):
        return "| " + " | ".join(map(str, cells)) + " |"
    sep = "|" + "".join(a + "|" for a in align or ["---"] * len(cols))
    return [line(cols), sep] + [line(r) for r in rows]


def write_pair(stem: str, markdown: str, data) -> None:
    """stem.md (the text as given) and stem.json (data, indent 1), creating the folder."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
