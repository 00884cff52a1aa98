"""A small progress bar on stderr (no dependency): redrawn in place on a terminal, a line every
10% otherwise (CI logs). Without a total (``total=None``) it shows a running count and rate
instead (``cache 120000 tokens 30s 4000 tokens/s``): redrawn in place on a terminal, a line
every ``every`` seconds otherwise; :meth:`Progress.finish` writes the last count."""
from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    def __init__(self, total: Optional[int], label: str = "", stream=None,
                 enabled: bool = True, unit: str = "", every: float = 10.0):
        self.total = None if total is None else max(1, total)
        self.label, self.enabled, self.unit, self.every = label, enabled, unit, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.last_decile = -1
        self.last_line = None    # (done, time) of the last line written, without a total
        self.open = False        # a line redrawn in place is not yet ended

    def __call__(self, done: int, total: int = None, info: str = "") -> None:
        if not self.enabled:
            return
        total = total or self.total
        if total is None:
            return self._count(done, info)
        frac = min(1.0, done / total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = f"{self.label} [{bar}] {done}/{total} {elapsed:.0f}s<{eta:.0f}s {info}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if done >= total else ""))
            self.open = done < total
            self.stream.flush()
        elif int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            self.stream.write(line + "\n")
            self.stream.flush()

    def _count(self, done: int, info: str = "", final: bool = False) -> None:
        """The running count and rate (no total to draw a bar against)."""
        now = time.perf_counter()
        elapsed = now - self.start
        unit = f" {self.unit}" if self.unit else ""
        rate = done / elapsed if elapsed > 0 else 0.0
        line = f"{self.label} {done}{unit} {elapsed:.0f}s {rate:.0f}{unit}/s {info}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if final else ""))
            self.open = not final
        elif (self.last_line is None or now - self.last_line[1] >= self.every
              or (final and self.last_line[0] != done)):
            self.last_line = (done, now)
            self.stream.write(line.rstrip() + "\n")
        else:
            return
        self.stream.flush()

    def finish(self, done: int, info: str = "") -> None:
        """The last count (without a total), or the end of a bar left short of its total."""
        if not self.enabled:
            return
        if self.total is None:
            self._count(done, info, final=True)
        elif self.tty and self.open:
            self.stream.write("\n")
            self.open = False
            self.stream.flush()
