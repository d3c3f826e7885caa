"""Which Python code a file may make ReCoKD run: none, unless the user trusts it by name.

Model files, model cards, teacher-preset JSON files and nnU-Net plans are what people download
and share. Their weights are read with ``weights_only=True``, but a card or a preset may also
*name* code: an entry point ``"package.module:callable"`` that builds the network, or an eval
hook. Importing and calling that would undo the safety of ``weights_only``. The rule:

**a file never chooses code to run.** An entry point named by a file is honoured only when

1. it resolves inside the allow-list: a curated set of MONAI segmentation networks
   (:data:`MONAI_NETWORKS`) and ReCoKD's own networks (``nn.Module`` subclasses defined in
   ``ReCoKDLib.networks``), checked on the *string* before anything is imported and on the
   object after, so attribute paths cannot climb out of it; or
2. the file is one that ships with ReCoKD (a built-in teacher preset); or
3. the user names it: an argument of the call (``load_model(..., entry_point=...)``,
   ``trust_entry_points=[...]``) or the CLI flag ``--trust-entry-point PKG.MODULE:CALLABLE`` of
   every command that loads models (``recokd serve`` included). Like ``trust_remote_code`` in
   Hugging Face, trusting is explicit and per name.

Anything else is refused with :class:`UntrustedCodeError`, which names the entry point, the
file that asked for it and how to trust it; nothing is imported.

Example::

    from ReCoKDLib.trust import trusted_entry_points
    from ReCoKDLib.teachers import load_model

    with trusted_entry_points(["mypkg.nets:MyUNet"]):   # what --trust-entry-point does
        model = load_model("downloaded_model.pt")
"""

from __future__ import annotations

import contextlib
import importlib
import re
from typing import Any, Iterable, Iterator

from ReCoKDLib.checkpoint import CheckpointError

__all__ = [
    "MONAI_NETWORKS",
    "UntrustedCodeError",
    "EntryPointError",
    "trusted_entry_points",
    "current_trusted",
    "entry_point_text",
    "error_fields",
    "is_allow_listed",
    "resolve_entry_point",
]

#: MONAI segmentation networks a file may name (``monai.networks.nets:<name>``): they build from
#: plain keyword arguments and download nothing (networks with pretrained-weight URLs or
#: torchvision backbones, such as FlexibleUNet or HoVerNet, are left out on purpose).
MONAI_NETWORKS = frozenset({
    "AttentionUnet", "BasicUNet", "BasicUNetPlusPlus", "DynUNet", "HighResNet", "MedNeXt", "SegResNet",
    "SegResNetDS", "SegResNetDS2", "SegResNetVAE", "SwinUNETR", "UNETR", "UNet", "VNet",
})
#: modules whose ``nn.Module`` subclasses a file may name
_RECOKD_NETWORK_MODULES = ("ReCoKDLib.networks",)

_SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: entry points trusted by the enclosing :func:`trusted_entry_points` blocks. Process-wide on
#: purpose (not a context variable): the web app and the Slicer logic load models in worker threads.
_trusted: frozenset[str] = frozenset()


class EntryPointError(CheckpointError):
    """An entry point is malformed, cannot be imported, or is not a callable."""


class UntrustedCodeError(CheckpointError):
    """A file names Python code to run that is neither allow-listed nor trusted by the user.

    Attributes:
        entry_point: the refused ``"package.module:callable"``.
        source: the file (or other source) that named it.
    """

    def __init__(self, message: str, entry_point: str = "", source: str = "") -> None:
        super().__init__(message)
        self.entry_point = entry_point
        self.source = source


@contextlib.contextmanager
def trusted_entry_points(specs: Iterable[str] | None) -> Iterator[frozenset[str]]:
    """Trust these entry points (exact ``"package.module:callable"`` strings) inside the block,
    in every thread of the process.

    Nested blocks add to the outer ones. The CLI wraps every command in one built from its
    ``--trust-entry-point`` flags.
    """
    global _trusted
    before = _trusted
    _trusted = before | frozenset(_normalise(s) for s in (specs or ()))
    try:
        yield _trusted
    finally:
        _trusted = before


def current_trusted() -> frozenset[str]:
    """The entry points trusted by the enclosing :func:`trusted_entry_points` blocks."""
    return _trusted


def _normalise(spec: Any) -> str:
    text = str(spec).strip() if isinstance(spec, str) else ""
    if not _SPEC.match(text):
        raise EntryPointError(f"an entry point is 'package.module:callable' (e.g. monai.networks.nets:UNet); got {spec!r}")
    return text


def entry_point_text(spec: Any) -> str:
    """``spec`` as the exact name trust is given to (stripped), checked to be ``"package.module:callable"``.

    Raises:
        EntryPointError: not of that form.
    """
    return _normalise(spec)


def error_fields(exc: BaseException) -> dict[str, str]:
    """Extra fields of the progress ``error`` event of a command ended by ``exc``: for an
    :class:`UntrustedCodeError`, ``entry_point`` (the refused name) and ``entry_point_source`` (the
    file that named it), so that a front end (the Slicer panel) can ask whether to trust that exact
    name instead of parsing the message; empty for any other exception."""
    if isinstance(exc, UntrustedCodeError) and exc.entry_point:
        return {"entry_point": exc.entry_point, "entry_point_source": exc.source}
    return {}


def is_allow_listed(spec: str) -> bool:
    """Whether ``spec`` names, by its text alone, something inside the allow-list.

    Private or dunder attributes and attribute paths (``Cls.attr``) are never allow-listed: only
    a single public class name in an allow-listed module.
    """
    try:
        module, attr = _normalise(spec).split(":")
    except EntryPointError:
        return False
    if "." in attr or attr.startswith("_"):
        return False
    if module == "monai.networks.nets":
        return attr in MONAI_NETWORKS
    return module in _RECOKD_NETWORK_MODULES


def _import(spec: str) -> Any:
    module_name, attr_path = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise EntryPointError(f"cannot import module {module_name!r} of entry point {spec!r}: {exc}") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise EntryPointError(f"module {module_name!r} has no attribute {attr_path!r} (entry point {spec!r})")
        obj = getattr(obj, attr)
    return obj


def _is_allowed_object(obj: Any) -> bool:
    """An allow-listed name must resolve to an ``nn.Module`` class defined in an allowed package."""
    from torch import nn

    module = getattr(obj, "__module__", "") or ""
    return (isinstance(obj, type) and issubclass(obj, nn.Module)
            and (module.startswith("monai.networks.") or module in _RECOKD_NETWORK_MODULES))


def resolve_entry_point(spec: str, *, source: str, trusted: Iterable[str] = (), builtin: bool = False,
                        what: str = "entry point") -> Any:
    """The callable ``spec`` names, if the rule of this module lets it run; else refuse.

    Args:
        spec: ``"package.module:callable"``.
        source: the file (or argument) that named it, for the message.
        trusted: entry points the caller names explicitly (added to :func:`current_trusted`).
        builtin: ``source`` ships with ReCoKD (a built-in teacher preset): trusted as a whole.
        what: what the callable is for (``"entry point"``, ``"eval hook"``), for the message.

    Raises:
        UntrustedCodeError: neither allow-listed, built in, nor trusted; nothing was imported.
        EntryPointError: malformed, not importable, or not callable.
    """
    spec = _normalise(spec)
    user_trusted = spec in current_trusted() or spec in {_normalise(s) for s in trusted}
    if not (builtin or user_trusted or is_allow_listed(spec)):
        raise UntrustedCodeError(
            f"{source} names the {what} {spec!r}: Python code that loading would import and run. ReCoKD runs code "
            f"named by a file only when you trust it by name. If you trust where this file comes from, pass "
            f"--trust-entry-point {spec} to recokd (segment, distill, evaluate, inspect, export, serve) or "
            f"trust_entry_points=[{spec!r}] to ReCoKDLib.teachers.load_model. Allowed without asking: ReCoKD's own networks and "
            f"monai.networks.nets:{{{', '.join(sorted(MONAI_NETWORKS))}}}",
            entry_point=spec, source=str(source))
    obj = _import(spec)
    if not (builtin or user_trusted) and not _is_allowed_object(obj):
        raise UntrustedCodeError(
            f"{source} names the {what} {spec!r}, which is not a network class of the allow-list; pass "
            f"--trust-entry-point {spec} to run it anyway", entry_point=spec, source=str(source))
    if not callable(obj):
        raise EntryPointError(f"entry point {spec!r} is not callable")
    return obj
