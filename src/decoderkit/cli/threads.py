"""How many CPU threads a command uses: `-t/--threads N`, else `DECODERKIT_THREADS` (or OpenMP's own
`OMP_NUM_THREADS`, which torchrun sets), else one per core this process may run on (`os.sched_getaffinity`); for the
short-lived commands (generate, chat, bench, convert, merge) only the cores that other processes left idle when the
command started (/proc/stat sampled over 0.1 s).

Torch's CPU wheel runs its intra-op pool on GNU OpenMP (libgomp). decoderkit has its idle workers spin briefly, then
sleep (`decoderkit._openmp`): on a quiet machine a wake-up per parallel region costs more than the region. A spinning
worker on a core another process keeps busy is what collapses: on the project's 2-core Zen 5 VM with one core taken,
the packaged SmolLM2 Q4_1 step decoded at 40 tok/s on two threads (short spin), 72 on two sleeping at once, and 87 on
one thread; with both cores taken, 35 / 28 / 54; quiet, 131 / 39 / 87. Counting the idle cores at start picks the
best row of each case. The server and training are long-lived, so a load seen at their start says little: they take
every usable core. benchmarks/threads.py measures the settings; see its docstring for the figures.
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


def _busy_and_total_jiffies() -> dict[str, tuple[int, int]] | None:
    """(busy, total) CPU time of each usable core so far, from /proc/stat; None where there is no /proc/stat."""
    try:
        lines = open("/proc/stat").read().splitlines()  # noqa: SIM115 - one read
    except OSError:
        return None
    usable, out = set(usable_cores()), {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in usable:
            values = [int(v) for v in fields[:8]]
            out[name] = (sum(values) - values[3] - values[4], sum(values))  # idle and iowait are not busy
    return out


def idle_cores(seconds: float = 0.1) -> int:
    """The usable cores that other processes used at most half of over the next `seconds` (at least 1; all of them
    where /proc/stat cannot be read)."""
    import time

    before = _busy_and_total_jiffies()
    if not before:
        return len(usable_cores())
    time.sleep(seconds)
    after = _busy_and_total_jiffies() or before
    busy = sum(1 for core, (used, total) in before.items() if core in after and after[core][1] > total
               and (after[core][0] - used) / (after[core][1] - total) > 0.5)
    return max(1, len(before) - busy)


def default_threads(idle_only: bool = False) -> int:
    """`DECODERKIT_THREADS`, else `OMP_NUM_THREADS`, when set; else the usable cores, or with `idle_only` those of
    them that other processes leave idle now (`idle_cores`)."""
    return threads_from_environment() or (idle_cores() if idle_only else len(usable_cores()))


# Weights up to which a CPU model decodes faster on one thread than on several when nobody chose a thread count:
# a step is then mostly per-call work, and each parallel region of a second thread adds a hand-over between threads.
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
                        help=f"CPU threads (default: ${THREADS_ENV} or $OMP_NUM_THREADS, else one per usable core; "
                             "for generate, chat, bench, convert and merge, per core left idle by other processes)")


def configure_threads(requested: int | None, idle_only: bool = False) -> int:
    """Apply `requested` threads (else `default_threads(idle_only)`) to torch's intra-op pool; return the count."""
    threads = requested if requested is not None else default_threads(idle_only)
    import torch

    torch.set_num_threads(threads)
    logger.info("%d CPU thread(s) (%s; %d usable cores), OMP_WAIT_POLICY=%s, GOMP_SPINCOUNT=%s", threads,
                "--threads" if requested is not None else "default", len(usable_cores()),
                os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"))
    return threads
