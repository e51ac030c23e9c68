"""The random number generators' states a training step draws from, saved in checkpoints so a resumed run continues
the same random streams (dropout masks, anything drawn from python's `random` or numpy)."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step draws from (python, numpy, torch CPU, CUDA), as tensors and plain numbers only,
    so that `torch.load(weights_only=True)` reads it back: a checkpoint from elsewhere cannot run code on resume."""
    version, python_key, python_gauss = random.getstate()
    kind, numpy_key, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": int(version), "python_key": torch.tensor(python_key, dtype=torch.int64),
        "python_gauss": python_gauss, "numpy_kind": str(kind),
        "numpy_key": torch.from_numpy(numpy_key.astype(np.int64)), "numpy_pos": int(numpy_pos),
        "numpy_has_gauss": int(numpy_has_gauss), "numpy_gauss": float(numpy_gauss), "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(file: str | os.PathLike) -> dict[str, Any]:
    """Read a file written from `rng_state()` with `weights_only=True`; ValueError for anything else (a pickle that
    would build other objects, such as one that runs code, is refused before any of it runs)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for a forbidden global; others for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{file}: not an RNG state that loads safely ({type(err).__name__}: {first}); it may be "
                         "from an older decoderkit or not from decoderkit at all. Only tensors and plain numbers are "
                         "read; delete the file to resume with freshly seeded random streams instead") from None
    kinds = {"python_version": int, "python_key": torch.Tensor, "python_gauss": (float, type(None)),
             "numpy_kind": str, "numpy_key": torch.Tensor, "numpy_pos": int, "numpy_has_gauss": int,
             "numpy_gauss": float, "torch": torch.Tensor}
    wrong = [k for k, kind in kinds.items() if not isinstance(state, dict) or k not in state
             or not isinstance(state[k], kind)]
    if wrong:
        raise ValueError(f"{file}: not an RNG state written by decoderkit (missing or mistyped: {', '.join(wrong)})")
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by `rng_state()`."""
    random.setstate((state["python_version"], tuple(state["python_key"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_kind"], state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["load_rng_state", "rng_state", "set_rng_state"]
