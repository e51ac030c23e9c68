"""How many CPU threads a command uses: `-t/--threads N`, else `DECODERKIT_THREADS` (or OpenMP's own
`OMP_NUM_THREADS`, which torchrun sets), else one per core this process may run on (`os.sched_getaffinity`).

Torch's CPU wheel runs its intra-op pool on GNU OpenMP (libgomp), whose idle workers spin before they sleep. On cores
shared with other work that made one thread per core 14x slower than one thread; with OpenMP's passive wait policy
(`decoderkit._openmp`, set when decoderkit is imported, before torch) one thread per core was instead the fastest
setting measured, ahead of one thread and ahead of counting only the cores other processes left idle (/proc/stat
sampled at start): under load more threads also get more of the scheduler's time. benchmarks/threads.py measures
all four; see its docstring for the figures.
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger("decoderkit.cli")
THREADS_ENV = "DECODERKIT_THREADS"


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """`DECODERKIT_THREADS`, else `OMP_NUM_THREADS`, when set; else the usable cores."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer number of threads")
            return int(value)
    return len(usable_cores())


def thread_count(text: str) -> int:
    """`-t/--threads`: a positive integer."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_threads_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `-t/--threads` option every command shares."""
    parser.add_argument("-t", "--threads", type=thread_count, default=None, metavar="N",
                        help=f"CPU threads (default: ${THREADS_ENV} or $OMP_NUM_THREADS, else one per usable core)")


def configure_threads(requested: int | None) -> int:
    """Apply `requested` threads (else `default_threads()`) to torch's intra-op pool; return the count."""
    threads = requested if requested is not None else default_threads()
    import torch

    torch.set_num_threads(threads)
    logger.info("%d CPU thread(s) (%s; %d usable cores), OMP_WAIT_POLICY=%s", threads,
                "--threads" if requested is not None else "default", len(usable_cores()),
                os.environ.get("OMP_WAIT_POLICY"))
    return threads
