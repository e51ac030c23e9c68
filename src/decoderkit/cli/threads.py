"""How many CPU threads a command uses: `-t/--threads N`, else `DECODERKIT_THREADS` (or OpenMP's own
`OMP_NUM_THREADS`, which torchrun sets), else the idle cores.

Torch's CPU wheel runs its intra-op pool on GNU OpenMP (libgomp), whose worker threads spin before they sleep and
whose parallel regions wait for their slowest thread. On a machine whose cores are busy with other work, one thread
per core therefore makes decoding several times slower than one thread (benchmarks/threads.py measures it): a
worker that the scheduler takes off its core stalls every region. The default counts the cores this process may
run on (`os.sched_getaffinity`) and leaves out the ones other processes keep busy, measured from /proc/stat over a
short interval: it follows the load as it is now, where /proc/loadavg lags by a minute and, in a container, counts
the whole host. OpenMP's wait policy is made passive as well (idle workers sleep at once), unless the user set
`OMP_WAIT_POLICY`; libgomp reads it when torch is imported, so `decoderkit/__init__` does that first of all
(`decoderkit._openmp`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

logger = logging.getLogger("decoderkit.cli")
THREADS_ENV = "DECODERKIT_THREADS"
SAMPLE_SECONDS = 0.1
# A core counts as taken when other processes used more than this share of it during the sample.
BUSY_SHARE = 0.5


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return list(range(os.cpu_count() or 1))


def _cpu_times(cores: list[int]) -> dict[int, tuple[int, int]] | None:
    """(busy, total) jiffies per core from /proc/stat, or None where there is no such file."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted, out = set(cores), {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in wanted:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + values[4]
        out[int(name[3:])] = (sum(values) - idle, sum(values))
    return out


def idle_cores(sample_seconds: float = SAMPLE_SECONDS) -> int:
    """The usable cores that other processes leave free right now (at least 1)."""
    cores = usable_cores()
    before = _cpu_times(cores)
    if not before:
        return len(cores)
    time.sleep(sample_seconds)
    after = _cpu_times(cores) or {}
    busy = 0
    for core, (busy0, total0) in before.items():
        busy1, total1 = after.get(core, (busy0, total0))
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) > BUSY_SHARE:
            busy += 1
    return max(1, len(cores) - busy)


def default_threads() -> int:
    """`DECODERKIT_THREADS`, else `OMP_NUM_THREADS`, when set; else the idle cores."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer number of threads")
            return int(value)
    return idle_cores()


def thread_count(text: str) -> int:
    """`-t/--threads`: a positive integer."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_threads_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `-t/--threads` option every command shares."""
    parser.add_argument("-t", "--threads", type=thread_count, default=None, metavar="N",
                        help=f"CPU threads (default: ${THREADS_ENV} or $OMP_NUM_THREADS, else the cores not busy "
                        "with other work right now)")


def configure_threads(requested: int | None) -> int:
    """Apply `requested` threads (else `default_threads()`) to torch's intra-op pool; return the count."""
    threads = requested if requested is not None else default_threads()
    import torch

    torch.set_num_threads(threads)
    logger.info("%d CPU thread(s) (%s; %d usable cores), OMP_WAIT_POLICY=%s", threads,
                "--threads" if requested is not None else "default", len(usable_cores()),
                os.environ.get("OMP_WAIT_POLICY"))
    return threads
