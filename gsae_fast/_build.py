"""How gsae_fast's extension was built: gsae_fast/_build_info.json, written by setup.py.

``pip install -q`` hides the build's output, so setup.py records the outcome next to the
package (git-ignored; see setup.py's docstring for the keys):
``{"ext": ..., "cuda": "built" | "failed" | "skipped", "cuda_wanted": bool, "reason": ...}``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

INFO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def build_info() -> Optional[dict]:
    """The recorded build outcome, or None (no build recorded it, or the file is unreadable)."""
    try:
        with open(INFO_PATH) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def cuda_build_warning() -> Optional[str]:
    """One line to warn with when the CUDA kernels were expected in this build (a CUDA toolkit
    and a CUDA torch were there) but their compile failed, or the toolkit was skipped for a
    version mismatch; None otherwise (built, not wanted, or no build info)."""
    info = build_info()
    if not info or not info.get("cuda_wanted") or info.get("cuda") not in ("failed", "skipped"):
        return None
    what = "failed to compile" if info["cuda"] == "failed" else "were skipped"
    return (f"gsae_fast: the CUDA kernels {what} when gsae_fast was built "
            f"({info.get('reason', 'no reason recorded')}); backend=\"cuda\" is unavailable. "
            "Reinstall with GSAE_FAST_CUDA=1 to see the error, or GSAE_FAST_CUDA=0 to build "
            "without them.")
