"""Which signal asked this process to stop, noted by whoever handles it.

The CLI's runner (:mod:`ReCoKDLib.commands.runner`) turns SIGTERM into an exception, except
while a training loop holds its own graceful handler (``engine``: write a checkpoint, then
return). Both note the signal here, so the command can end with the interrupted exit code (143)
and say how to resume even when the loop returned normally.
"""

from __future__ import annotations

import signal

__all__ = ["note_signal", "received", "forget", "signal_name"]

_received: list[int] = []


def note_signal(signum: int) -> None:
    """Remember that ``signum`` arrived (called from signal handlers: no allocation-heavy work)."""
    _received.append(int(signum))


def received(signum: int | None = None) -> bool:
    """True when ``signum`` (any signal when ``None``) was noted since the last :func:`forget`."""
    return bool(_received) if signum is None else int(signum) in _received


def forget() -> None:
    """Start afresh (a new command in the same process)."""
    _received.clear()


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
