"""A run's output directory: what a run leaves there, and the rule that a fresh run starts only in an empty one (or
one cleared of an earlier run's files on request), so a second run never silently mixes into or replaces the first."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from decoderkit.checkpoint_sources import listing as _listing

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
RUN_FILES = frozenset({"final", "merged", "log.jsonl", "loss_curve.png"})
RUN_DIR_RE = re.compile(r"checkpoint-\d+|\.checkpoint-\d+\.(tmp|old)")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` directories of an output directory, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def run_outputs(output_dir: str | os.PathLike) -> list[Path]:
    """What a run leaves in its output directory: checkpoints (and their staging copies), the final model, the merged
    model of the command line's `--merge`, the log and the loss curve."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name in RUN_FILES or RUN_DIR_RE.fullmatch(p.name))


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, resume_from: str | None,
                     overwrite_flag: str = "overwrite_output_dir=True",
                     resume_flag: str = "resume_from='latest'") -> None:
    """Refuse to start a fresh run in a directory that is not empty (ValueError naming what it holds and the flags
    that allow it), unless `overwrite` is set or `resume_from` continues a run from a checkpoint.

    `overwrite_flag` and `resume_flag` are how the caller spells those options (the command line passes its own)."""
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: the output directory exists and is not a directory")
    if overwrite or not root.is_dir():
        return
    checkpoints = list_checkpoints(root)
    if resume_from is not None and (resume_from != "latest" or checkpoints):
        return
    contents = sorted(p.name for p in root.iterdir())
    if not contents:
        return
    if checkpoints:
        raise ValueError(f"{root} already holds checkpoints of an earlier run ({checkpoints[-1].name}); pass "
                         f"{resume_flag} to continue that run, or {overwrite_flag} to delete its files and start over")
    unresumable = " and no checkpoint to resume from" if resume_from is not None else ""
    raise ValueError(f"{root} is not empty (it holds {_listing(contents)}){unresumable}; pass {overwrite_flag} to "
                     "delete an earlier run's files and start over, or choose another output directory")


def clear_run_outputs(output_dir: str | os.PathLike) -> None:
    """Delete an earlier run's files (`run_outputs`) from an output directory; other files stay."""
    for path in run_outputs(output_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


__all__ = ["check_output_dir", "clear_run_outputs", "list_checkpoints", "run_outputs"]
