"""Crash-safe checkpoints: write to a temp file, fsync, rename; keep the last N; find the latest for ``--resume auto``.

A kill at any moment leaves either the previous checkpoint or the new one, never a truncated ``latest``: readers
only ever see complete files because ``os.replace`` is atomic on POSIX, and the directory is fsynced so the rename
survives a power loss.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

PATTERN = re.compile(r"^step_(\d{9})\.pt$")
TEMP_PATTERN = re.compile(r"^\.step_\d{9}\.pt\..*\.tmp$")  # what save_checkpoint writes before its rename


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.pt"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in a checkpoint's file name (``step_<step>.pt``)."""
    match = PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (step_<9 digits>.pt)")
    return int(match.group(1))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temp files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.match(p.name))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, step: int, *, keep_last: int) -> Path:
    """Atomically writes ``state`` as ``step_<step>.pt`` and deletes all but the newest ``keep_last``, and any temp
    file a killed earlier write left behind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():  # temp files of writes killed midway (one writer per directory: rank 0)
        if TEMP_PATTERN.match(stale.name):
            stale.unlink(missing_ok=True)
    final = checkpoint_path(directory, step)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` (on the CPU; the trainer moves tensors).

    Checkpoints hold only tensors and plain Python values, so the safe ``weights_only`` loader reads them.
    """
    return torch.load(path, map_location="cpu", weights_only=True)
