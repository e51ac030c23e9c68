"""Suite-wide settings."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import pytest
import torch

# The CLI compiles the decode step by default; a compilation costs seconds, so the suite's many CLI runs opt out and
# the tests of the compiled default opt back in
os.environ.setdefault("DECODERKIT_COMPILE", "0")
# The same for the CLI's thread choice: commands run in this process must not raise the suite's one thread (below).
os.environ.setdefault("DECODERKIT_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def single_intra_op_thread():
    """The test models are tiny: one intra-op thread is faster than two, and on a shared 2-core machine a second
    OpenMP thread that has to wait for a busy core makes each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def untimed_schedule(monkeypatch):
    """Speculative decoding's schedule from the acceptance alone, not the clock: a test's proposals then do not
    depend on how fast this machine runs its model (on a tiny test model a verify forward can cost more plain steps
    than it keeps tokens, and the timed schedule pauses it)."""
    from decoderkit.generation.speculative import ProposalSchedule

    monkeypatch.setattr(ProposalSchedule, "timed", False)


@dataclass(frozen=True)
class FlashBackend:
    """Where the flash_attention_2 tests run: the CPU double in fp32, or the real kernel on CUDA in bf16."""

    name: str
    device: str
    dtype: torch.dtype
    tol: float  # relative, of flash against sdpa on the same device and dtype


def _real_flash_attn() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.fixture(params=["double", "cuda"])
def flash_backend(request, monkeypatch) -> FlashBackend:
    """Makes attn_implementation="flash_attention_2" usable: on CPU through tests/flash_attn_double.py patched in as
    the flash_attn package; with a GPU and flash_attn installed, the same tests run once more on the real kernel."""
    if request.param == "cuda":
        if not _real_flash_attn():
            pytest.skip("not applicable: needs CUDA and the flash_attn package")
        return FlashBackend("cuda", "cuda", torch.bfloat16, 2e-2)
    import flash_attn_double

    import decoderkit.layers.attention
    import decoderkit.model

    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_double)
    for module in (decoderkit.layers.attention, decoderkit.model):
        monkeypatch.setattr(module, "flash_attention_available", lambda: True)
    return FlashBackend("double", "cpu", torch.float32, 1e-4)
