"""Runs a worker script on 2 gloo ranks under torchrun, as the multi-process tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_two_ranks(script: Path, *args: str, timeout: int) -> None:
    """`torchrun --standalone --nproc_per_node 2 script *args` with one intra-op thread per rank; fails the test
    with the ranks' output when it does not finish in `timeout` seconds or exits non-zero."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {timeout} s: {(err.stderr or b'')[-2000:]!r}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
