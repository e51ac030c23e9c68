"""Small file helpers shared by everything that writes to disk."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def current_umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], content: str | bytes) -> Path:
    """Write `content` to `path` through a temporary file in the same directory and a rename, so readers never see a
    half-written file. The file gets the usual permissions (mkstemp alone would make it private)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w", **({} if isinstance(content, bytes) else
                                                                             {"encoding": "utf-8"})) as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, with the usual permissions: safetensors writes its files private (0600), which
    would leave the weights of a saved directory unreadable to those who can read every other file beside them."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(dict(tensors), path, metadata=dict(metadata) if metadata is not None else None)
    os.chmod(path, 0o666 & ~current_umask())
    return path
