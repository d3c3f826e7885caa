"""Checkpoints that never lose work and never run foreign code.

* :func:`atomic_torch_save` / :func:`atomic_write_text` write to a temporary file in the target
  folder, flush it to disk, then ``os.replace`` it over the target: a crash or ``kill -9`` leaves
  either the old file or the new one, never half of one.
* :func:`safe_torch_load` always uses ``torch.load(..., weights_only=True)``: a checkpoint that
  needs arbitrary code to unpickle is refused with :class:`CheckpointError` before anything runs.
* A **ReCoKD model file** (``.pt``) holds ``{"format": "recokd-model", "format_version": 1,
  "card": <JSON text>, "state_dict": {...}}``; the card (:class:`ModelCard`) says how to rebuild
  the network and how to feed it. A copy of the card is written beside it as ``<name>.json`` for
  people and for the Slicer panel, which can read it without torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import secrets
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

MODEL_FORMAT = "recokd-model"
MODEL_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe, or not what was expected."""


class NotAModelFileError(CheckpointError):
    """The file's bytes are not a PyTorch file at all (random bytes, text, another archive)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint names objects outside what ``weights_only`` loading allows; nothing of it ran.

    Attributes:
        culprit: the refused pickle global as torch reports it (``"GLOBAL os.system"``), or ``""``.
    """

    def __init__(self, message: str, culprit: str = "") -> None:
        super().__init__(message)
        self.culprit = culprit


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _new_name(folder: Path, prefix: str, suffix: str, create) -> Path:
    """``create(candidate)`` on fresh random names in ``folder`` until one does not exist yet."""
    for _ in range(1000):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {folder}")


def create_temp_file(folder: str | os.PathLike, prefix: str = ".tmp.", suffix: str = "") -> Path:
    """A new empty file in ``folder`` with the permissions ``open()`` would give it.

    Unlike ``tempfile.mkstemp`` (always ``0600``), the mode follows the process umask
    (``0666 & ~umask``), so an output renamed into place is readable by whoever may read the
    user's other files (a colleague, the PACS exporter).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return _new_name(Path(folder), prefix, suffix, lambda p: os.close(os.open(p, flags, 0o666)))


def create_temp_dir(folder: str | os.PathLike, prefix: str = ".tmp.") -> Path:
    """A new folder in ``folder`` with the permissions ``mkdir`` gives (``0777 & ~umask``; ``tempfile.mkdtemp``
    makes it ``0700``), for outputs that are built in place and then renamed."""
    return _new_name(Path(folder), prefix, "", lambda p: os.mkdir(p, 0o777))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp", verify=None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (``os.replace``).

    On any error the temporary file is removed and ``path`` is left as it was, so readers only
    ever see the old file or the complete new one. ``suffix`` keeps the extension for writers
    that choose the format from it (``.nii.gz``, ``.nrrd``). ``verify(tmp)``, when given, runs
    after the writer and before the rename; it raises (``OSError``) when the written file is not
    complete, e.g. a writer that does not report a full disk.

    The new file gets the permissions ``open()`` would give: those of the file it replaces, or
    ``0666 & ~umask`` for a new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_file(path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # replacing a file keeps its mode, as open() does
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise OutputWriteError.of(path, exc) from exc
        raise


#: errno values that mean "no room": a full disk, a quota, a file-size limit
_NO_ROOM = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name))


class OutputWriteError(OSError):
    """An output could not be written completely; the file it would replace is kept as it was.

    ``str()`` is one sentence naming the file, the reason and (for a full disk) the free space.
    """

    def __str__(self) -> str:
        return str(self.strerror)

    @classmethod
    def of(cls, path: str | os.PathLike, exc: BaseException | str) -> "OutputWriteError":
        """The error for ``path`` from the writer's exception (or a reason text)."""
        import shutil

        path = Path(path)
        code = getattr(exc, "errno", None)
        reason = (getattr(exc, "strerror", None) or str(exc)).strip() or type(exc).__name__
        if code in _NO_ROOM:
            try:
                free = shutil.disk_usage(path.parent).free
                reason += f" ({free / 2**20:.1f} MiB free on the disk of {path.parent})"
            except OSError:
                pass
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        return cls(code or errno.EIO, f"cannot write {path}: {reason}; {kept}", str(path))


def _atomic_write(path: Path, write) -> Path:
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + rename)."""
    return _atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    return _atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def safe_torch_load(path: str | os.PathLike, map_location: str = "cpu", *, safe_globals: Sequence[Any] = ()) -> Any:
    """Load a torch file with ``weights_only=True``; refuse anything that needs code to unpickle.

    Args:
        path: the file.
        map_location: as in ``torch.load``.
        safe_globals: extra plain types a known file format pickles (``torch.serialization.safe_globals``
            entries, e.g. the numpy scalars of nnU-Net checkpoints); never code.

    Raises:
        UnsafeCheckpointError: the file holds objects other than tensors, plain containers and
            ``safe_globals`` (a possibly malicious pickle; nothing of it was run).
        CheckpointError: the file is missing, truncated or not a torch file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    reason = not_a_torch_file_reason(path)
    if reason:
        raise NotAModelFileError(f"{path} is not a model file: {reason}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        if not culprit and "Unsupported" not in str(exc):  # a broken pickle, not a refused one
            raise CheckpointError(f"cannot read checkpoint {path}: its pickled data is corrupt "
                                  f"({str(exc).strip().splitlines()[-1]})") from None
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds objects that only arbitrary code could rebuild"
            f"{' (' + culprit + ')' if culprit else ''}. Nothing of it was run. ReCoKD loads tensors and "
            f"plain containers only; re-save the weights as a state dict (torch.save(model.state_dict(), ...)).",
            culprit,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as exc:  # Index/KeyError: garbage
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a torch file ({exc})") from None


#: the first bytes of a pickle (protocol 2 to 5): torch's legacy, non-zip file format
_PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def not_a_torch_file_reason(path: str | os.PathLike) -> str:
    """Why the bytes of ``path`` cannot be a PyTorch file, or ``""`` when they may be one.

    Looks at the bytes only (nothing is unpickled): a PyTorch file is a zip archive holding
    ``<name>/data.pkl`` (``torch.save``; TorchScript adds ``constants.pkl``) or, in torch's legacy
    format, a pickle. Empty files, text, other zip archives and other bytes get a reason that names
    what the file is instead.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head:
        return "the file is empty"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"it is a damaged zip archive ({exc})"
        if any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
            return ""
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"it is a zip archive but not a PyTorch file (no <name>/data.pkl inside; it holds {shown or 'nothing'})"
    if head.startswith(_PICKLE_MAGIC):
        return ""
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            first = text.strip().splitlines()[0][:60] if text.strip() else ""
            return f"it is a text file (it starts with {first!r}), not a PyTorch file"
    return (f"its bytes are neither a PyTorch archive (zip) nor a pickle (it starts with {head[:8].hex(' ')}); "
            "give a ReCoKD model file (.pt with its .json card), a TorchScript file or an nnU-Net model folder")


@dataclass
class ModelCard:
    """How to rebuild a network and how to feed it. JSON-serialisable.

    Attributes:
        architecture: ``{"kind": "dynunet", "config": UNetConfig.to_dict()}`` or
            ``{"kind": "entry_point", "factory": "package.module:callable", "kwargs": {...}}``.
        classes: class names, index = label value, ``classes[0]`` the background.
        spacing: target voxel spacing in mm, array axis order ``(D, H, W)`` = ``(z, y, x)``.
        normalization: ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}`` or
            ``{"scheme": "zscore"}`` (per volume, over non-zero voxels) or ``{"scheme": "none"}``.
        patch_size: sliding-window / training patch ``(D, H, W)`` in voxels.
        in_channels: image channels.
        role: ``"teacher"`` or ``"student"``.
        tap_names: module names of the distilled feature levels.
        metrics, kd, provenance: free-form records (validation Dice, KD configuration, hashes,
            library versions, dataset).
        label_spec: region-based labels / ignore label as in a dataset.json (``{"labels": {...},
            "regions_class_order": [...]}``); with regions the network has one sigmoid output per
            region and ``classes`` names the values of the painted label map.
        colors: display colour of each class, RGB in [0, 1] by class id (segments in Slicer, DICOM
            SEG); empty: the front end's default table.
        postprocessing: what segmentation does to the label map after the network
            (:mod:`ReCoKDLib.postprocess`), e.g. ``{"keep_largest_component": ["brain"]}``; a
            student inherits its teacher's; empty: nothing.
        inference: how ``recokd segment`` runs the model when not told otherwise, e.g.
            ``{"overlap": 0.25}`` (the sliding-window overlap, in ``[0, 1)``); empty: the product's
            defaults (overlap 0.5, :data:`ReCoKDLib.infer.DEFAULT_OVERLAP`). Written by a run whose
            ``TrainConfig.inference_overlap`` is set, after measuring what it costs.
    """

    architecture: dict[str, Any]
    classes: list[str]
    spacing: list[float]
    normalization: dict[str, Any]
    patch_size: list[int]
    in_channels: int = 1
    role: str = "teacher"
    tap_names: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    kd: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: nnU-Net label semantics of the outputs (``nnunet.labels.LabelSpec.to_dict()``: ``labels`` with
    #: regions and the ignore label, ``regions_class_order``); empty for plain softmax classes
    label_spec: dict[str, Any] = field(default_factory=dict)
    colors: list[list[float]] = field(default_factory=list)
    postprocessing: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        required = ("architecture", "classes", "spacing", "normalization", "patch_size")
        missing = [k for k in required if k not in data]
        if missing:
            raise CheckpointError(f"model card lacks {missing}; it needs {list(required)}")
        known = set(cls.__dataclass_fields__)
        card = cls(**{k: v for k, v in data.items() if k in known})
        from ReCoKDLib.postprocess import PostProcessingError, steps_for_card

        try:  # a hand-edited card is refused when it is read, not after a whole inference
            steps_for_card(card.postprocessing, list(card.classes))
        except PostProcessingError as exc:
            raise CheckpointError(f"model card: postprocessing: {exc}") from None
        check_inference_record(card.inference)
        return card


def check_inference_record(record: Any) -> None:
    """Refuse a card's ``inference`` record that ``recokd segment`` could not follow (unknown keys,
    an overlap outside ``[0, 1)``) when the card is read, with the reason."""
    if not isinstance(record, dict):
        raise CheckpointError(f"model card: inference must be an object such as {{\"overlap\": 0.25}}; got {record!r}")
    unknown = sorted(set(record) - {"overlap"})
    if unknown:
        raise CheckpointError(f"model card: inference has unknown keys {unknown}; known: overlap")
    if "overlap" in record:
        overlap = record["overlap"]
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
            raise CheckpointError(f"model card: inference.overlap must be a number in [0, 1); got {overlap!r}")


def card_path_for(model_path: str | os.PathLike) -> Path:
    """The sidecar JSON of a model file: ``student.pt`` -> ``student.json``."""
    return Path(model_path).with_suffix(".json")


def save_model(path: str | os.PathLike, state_dict: dict[str, Any], card: ModelCard) -> Path:
    """Write a ReCoKD model file and its sidecar card, both atomically. Returns the model path."""
    path = Path(path)
    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "card": card.to_json(),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    atomic_torch_save(payload, path)
    atomic_write_text(card_path_for(path), card.to_json() + "\n")
    return path


def load_model_file(path: str | os.PathLike) -> tuple[ModelCard, dict[str, Any]]:
    """Read a ReCoKD model file safely. Returns ``(card, state_dict)``.

    Raises:
        CheckpointError: not a ReCoKD model file, a newer format, or unsafe/corrupt (see
            :func:`safe_torch_load`).
    """
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(
            f"{path} is not a ReCoKD model file (no 'format': '{MODEL_FORMAT}' entry); for a bare state dict "
            f"give the architecture as an entry point, or use a TorchScript file"
        )
    if int(payload.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has model format version {payload['format_version']}, newer than this ReCoKD "
            f"understands ({MODEL_FORMAT_VERSION}); update ReCoKD"
        )
    try:
        card = ModelCard.from_dict(json.loads(payload["card"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has an unreadable model card: {exc}") from None
    return card, payload["state_dict"]


def read_model_card(path: str | os.PathLike) -> ModelCard:
    """The card of a model file: from the sidecar JSON when present (no torch needed), else from the file."""
    sidecar = card_path_for(path)
    if sidecar.is_file():
        return ModelCard.from_dict(json.loads(sidecar.read_text()))
    return load_model_file(path)[0]
