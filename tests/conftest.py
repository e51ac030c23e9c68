"""Suite-wide settings."""

from __future__ import annotations

import os

import pytest
import torch

# The CLI compiles the decode step by default; a compilation costs seconds, so the suite's many CLI runs opt out and
# the tests of the compiled default opt back in
os.environ.setdefault("DECODERKIT_COMPILE", "0")


@pytest.fixture(autouse=True, scope="session")
def single_intra_op_thread():
    """The test models are tiny: one intra-op thread is faster than two, and on a shared 2-core machine a second
    OpenMP thread that has to wait for a busy core makes each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
