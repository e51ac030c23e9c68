"""Imported first by `decoderkit`, before torch: OpenMP's idle workers should sleep, not spin.

Torch's CPU wheel runs its thread pool on GNU OpenMP, which reads `OMP_WAIT_POLICY` once, when torch loads it. By
default idle workers spin for a while before they sleep; on cores shared with other work, decoding with one thread
per core became 14-20x slower than with one thread (benchmarks/threads.py), and the passive policy recovers most of
it. A policy the user set is kept; once torch is imported, nothing here changes anything.
"""

import os
import sys


def prefer_passive_openmp() -> None:
    """`OMP_WAIT_POLICY=PASSIVE` unless set already (empty counts as unset), while torch is not imported yet."""
    if "torch" not in sys.modules and not os.environ.get("OMP_WAIT_POLICY", "").strip():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


prefer_passive_openmp()
