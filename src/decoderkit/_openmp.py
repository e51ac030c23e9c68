"""Imported first by `decoderkit`, before torch: how OpenMP's idle workers wait.

Torch's CPU wheel runs its thread pool on GNU OpenMP (libgomp), which reads its environment once, when torch loads
it. By default an idle worker spins for up to 300,000 iterations before it sleeps; a decode step is hundreds of
short parallel regions (a matmul, a norm, an attention call each) with gaps of microseconds between them.

* Spinning that long on cores shared with other work made decoding with one thread per core 14-20x slower than one
  thread (benchmarks/threads.py, on the project's 2-core Zen 3 VM at load 7-12).
* Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``, this module's earlier default) pays a wake-up per region: on a quiet
  2-core Zen 5 VM the packaged SmolLM2 Q4_1 step decoded at 39 tok/s passive against 131 with a short spin and 87 on
  one thread (the same benchmark, `--compile aot`): each wake-up of a sleeping virtual CPU goes through the
  hypervisor.

So the default is a short spin, ``GOMP_SPINCOUNT`` = `SPIN_COUNT` iterations (microseconds), then sleep: it bridges
the gaps inside a step and sleeps between steps and requests. Where other processes keep cores busy, spinning of any
length loses to sleeping (40 against 72 tok/s with one core taken): the command line then counts only the idle cores
(`decoderkit.cli.threads`). A policy or spin count the user set is kept; once torch is imported, nothing here changes
anything.
"""

import ctypes
import os
import sys

SPIN_COUNT = "1000"
# What this module put in the environment (child processes inherit it)
SET_HERE: dict[str, str] = {}


def prefer_short_spin() -> None:
    """``GOMP_SPINCOUNT=SPIN_COUNT`` unless `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is set already (empty counts as
    unset), while torch is not imported yet."""
    chosen = any(os.environ.get(name, "").strip() for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    if "torch" not in sys.modules and not chosen:
        os.environ["GOMP_SPINCOUNT"] = SET_HERE["GOMP_SPINCOUNT"] = SPIN_COUNT


def environment_of_others() -> dict[str, str]:
    """This process's environment without what `prefer_short_spin` added: for starting another program (llama.cpp
    also runs on OpenMP) with its own defaults, as its users run it."""
    return {k: v for k, v in os.environ.items() if SET_HERE.get(k) != v}


def release_thread_pool() -> bool:
    """End the calling thread's OpenMP worker threads (OpenMP 5's ``omp_pause_resource_all``, soft); the thread's
    next parallel region starts new ones. True if the runtime did it.

    Call it in a thread that is about to hand its torch work to another thread for good (the server's engine). GNU
    OpenMP keeps a pool of workers for every thread that ever ran a parallel region, and once it manages more threads
    than there are CPUs it all but stops spinning (its "throttled" spin of 100 iterations): every region then pays
    sleeping workers' wake-ups. A model loaded and warmed up in the main thread and served from an engine thread
    held 2 + 2 threads on a 2-core machine, so the engine ran as if ``OMP_WAIT_POLICY=PASSIVE`` were set: a packaged
    SmolLM2 decode step took 31-35 ms there against 7.5-8 ms in the main thread (2-core Zen 5).
    """
    # The runtime torch loaded (its wheel bundles libgomp): opened with RTLD_NOLOAD, so never a second copy.
    for line in _maps():
        path = line.rsplit(" ", 1)[-1].strip()
        name = os.path.basename(path)
        if not name.startswith(("libgomp", "libiomp", "libomp")):
            continue
        try:
            runtime = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
            pause = runtime.omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(1) == 0  # omp_pause_soft
    return False


def _maps() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return [line for line in maps if ".so" in line]
    except OSError:  # not Linux: nothing to release
        return []


prefer_short_spin()
