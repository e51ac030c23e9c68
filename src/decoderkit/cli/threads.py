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


def threads_from_environment() -> int | None:
    """`DECODERKIT_THREADS`, else `OMP_NUM_THREADS`, when set."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer number of threads")
            return int(value)
    return None


def default_threads() -> int:
    """`DECODERKIT_THREADS`, else `OMP_NUM_THREADS`, when set; else the usable cores."""
    return threads_from_environment() or len(usable_cores())


# Weights up to which a CPU model decodes faster on one thread than on several when nobody chose a thread count:
# a step is then mostly per-call work, and each parallel region of a second thread adds a wake-up (passive waits).
# The shipped 5 MiB model decodes about twice as fast on one thread as on two on the project's 2-core CPU
# (`decoderkit bench -t 1` against `-t 2`); SmolLM2-135M (270 MB) is faster on two.
SMALL_MODEL_BYTES = 16 * 2**20


def fit_threads(model: object, threads: int, chosen: bool) -> int:
    """The thread count for `model` (a loaded CPU model): 1 for a model of at most `SMALL_MODEL_BYTES` of weights
    unless the count was `chosen` (`-t`, or the environment), else `threads`; applied to torch's pool. Buffers
    count: a quantized layer keeps its packed weights there."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]  # type: ignore[attr-defined]
    small = sum(t.numel() * t.element_size() for t in tensors) <= SMALL_MODEL_BYTES
    if chosen or threads == 1 or not small or (tensors and tensors[0].device.type != "cpu"):
        return threads
    torch.set_num_threads(1)
    logger.info("1 CPU thread for a model this small (-t N to choose)")
    return 1


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
