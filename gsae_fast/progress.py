"""A small progress bar on stderr (no dependency): redrawn in place on a terminal, a line every
10% otherwise (CI logs)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, enabled: bool = True):
        self.total, self.label, self.enabled = max(1, total), label, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.last_decile = -1

    def __call__(self, done: int, total: int = None, info: str = "") -> None:
        if not self.enabled:
            return
        total = total or self.total
        frac = min(1.0, done / total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = f"{self.label} [{bar}] {done}/{total} {elapsed:.0f}s<{eta:.0f}s {info}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if done >= total else ""))
            self.stream.flush()
        elif int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            self.stream.write(line + "\n")
            self.stream.flush()
