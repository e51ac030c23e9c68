"""Small file helpers shared by everything that writes to disk."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def current_umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file beside `path` to write into; when the block ends it is synced to disk, given the usual
    permissions (mkstemp alone would make it private) and renamed over `path`, so readers never see a half-written
    file. If the block raises, the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], content: str | bytes) -> Path:
    """Write `content` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return Path(path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, with the usual permissions: safetensors writes its files private (0600), which
    would leave the weights of a saved directory unreadable to those who can read every other file beside them."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(dict(tensors), path, metadata=dict(metadata) if metadata is not None else None)
    os.chmod(path, 0o666 & ~current_umask())
    return path


def cache_root() -> Path:
    """decoderkit's cache directory (compiled kernels, decode-step packages, inductor's code):
    `$DECODERKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/decoderkit` (`~/.cache/decoderkit`)."""
    root = os.environ.get("DECODERKIT_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decoderkit")
    return Path(root).expanduser()
