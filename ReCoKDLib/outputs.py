"""Where outputs go, checked before any long work starts.

* :func:`check_destination`: a file or folder can be created at a path (its nearest existing folder
  accepts a new file: a real probe, so read-only mounts and ACLs count, and root is not waved
  through as ``os.access`` would), so an unwritable destination is found before minutes of
  inference, not after.
* :func:`check_not_input`: an output is never one of the inputs (the same file after resolving
  symbolic and hard links), unless the caller explicitly forces it.

Both raise :class:`DestinationError` (a ``ValueError``: bad input, exit code 2 in the CLI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

__all__ = ["DestinationError", "check_destination", "check_not_input", "same_file"]


class DestinationError(ValueError):
    """An output cannot be written where it was asked for, or would overwrite an input."""


def check_destination(path: str | os.PathLike, what: str = "output", folder: bool = False) -> Path:
    """Raise :class:`DestinationError` unless ``path`` can be written.

    Args:
        path: the file (or, with ``folder``, the folder) to be written; missing parent folders are
            fine when they can be created.
        what: how the message names it (``"--out"``, ``"--probabilities"``).
        folder: ``path`` is a folder to write files into (an existing file there is an error).

    Returns:
        ``path`` as a ``Path``. Nothing is left behind (the probe file is removed).
    """
    from ReCoKDLib.checkpoint import create_temp_file

    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise DestinationError(f"{what} {path} is a file; give a folder")
    if not folder and path.is_dir():
        raise DestinationError(f"{what} {path} is a folder; give a file name")
    probe_in = path if folder and path.is_dir() else path.parent
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise DestinationError(f"cannot write {what} {path}: {probe_in} is a file, not a folder")
    try:
        os.unlink(create_temp_file(probe_in, prefix=".recokd-write-probe-"))
    except OSError as exc:
        raise DestinationError(f"cannot write {what} {path}: {probe_in} does not accept new files "
                               f"({exc.strerror or exc}); choose another place") from None
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file or folder (links resolved; hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: then they are one only if they resolve alike
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_not_input(outputs: Iterable[tuple[str, str | os.PathLike | None]],
                    inputs: Iterable[str | os.PathLike], force: bool = False, force_flag: str = "--overwrite-input"
                    ) -> None:
    """Raise :class:`DestinationError` when an output is one of the inputs (same file).

    Args:
        outputs: ``(what, path)`` pairs (``path`` ``None`` for an output that is not written).
        inputs: the input files and folders.
        force: allow it (the user asked for it by ``force_flag``).
    """
    if force:
        return
    inputs = [Path(p) for p in inputs if p is not None]
    for what, out in outputs:
        if out is None:
            continue
        for source in inputs:
            if same_file(out, source):
                raise DestinationError(
                    f"{what} {out} is the input {source} (the same file): writing it would destroy the input. "
                    f"Choose another output path, or pass {force_flag} if that is really meant")
