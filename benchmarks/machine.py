"""The machine a benchmark ran on, for the header of its results."""
import platform


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (what platform knows where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
