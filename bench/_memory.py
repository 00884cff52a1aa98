"""Peak resident memory of one call, for the benchmarks (Linux /proc; run each measured call in
a fresh process, so that the peak is that call's)."""


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
