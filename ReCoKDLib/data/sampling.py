"""Training patches: checked and cached preprocessed cases, class-balanced sampling, augmentation.

The pipeline of one training batch, each step a small function:

1. :func:`load_raw_case` reads a case's image channel(s) and label and checks them
   (:func:`check_image_label`): 3D volumes, one voxel grid, integer label values within the
   classes, a label that is not empty. Any problem raises :class:`SamplingError` (or the I/O
   module's ``GeometryError`` / ``ImageDimensionError``, which are ``ValueError`` too) naming the
   case and saying what to change.
2. :class:`CaseCache` preprocesses a case once (resampling, normalisation, cropping: any function
   with the signature of ``ReCoKDLib.data.preprocess.preprocess_case``) and stores the result as
   ``.npy`` arrays plus a JSON card, under a key hashed from the SHA-256 of the source files and
   the preprocessing parameters: later epochs and runs read it back (memory-mapped).
3. :class:`PatchSampler` draws patches ``(C, *patch)``/``(1, *patch)`` from the cases with
   nnU-Net's foreground oversampling (a share ``oversample_foreground`` of the patches is centred
   on a voxel of a random class present in the case; the rest is uniform), padding volumes
   smaller than the patch, then augments them: one draw (:func:`draw_augmentation`) per patch,
   its spatial part (rotation/scaling about the patch centre, flips) applied identically to the
   image, the labels and a teacher's cached outputs, its intensity part (noise, brightness, gamma)
   to the image only. All randomness comes from one ``numpy.random.Generator`` the sampler owns;
   :meth:`PatchSampler.state_dict` / :meth:`PatchSampler.load_state_dict` make a resumed run draw
   exactly the batches an uninterrupted one would have drawn.
4. Cases may carry a frozen teacher's outputs on the whole case (:class:`TeacherTargets`, built
   by ``ReCoKDLib.engine.teacher_cache``): the sampler then crops the teacher's logits with the
   same box as the image, and its features at stride ``s`` with the box divided by ``s`` (patch
   starts are multiples of the largest stride, so the crops are exact), and
   :meth:`PatchSampler.draw` returns them with the batch.

Shapes: images ``(C, D, H, W)`` float32, labels ``(1, D, H, W)`` integer class ids; batches
``(B, C, *patch)`` float32 and ``(B, 1, *patch)`` int64; teacher logits ``(B, K, *patch)`` and
features ``(B, C_l, *patch / s_l)`` float32. Axis order ``(D, H, W)`` = ``(z, y, x)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "SamplingError",
    "CaseArrays",
    "CaseSet",
    "CaseCache",
    "PatchSampler",
    "AugmentationConfig",
    "AugmentationDraw",
    "draw_augmentation",
    "apply_spatial",
    "spatial_matrix",
    "SpatialTransform",
    "TeacherTargets",
    "PatchBatch",
    "check_image_label",
    "check_label_values",
    "load_raw_case",
    "prepare_cases",
    "class_locations",
    "crop_with_padding",
    "cache_key",
    "UNLABELLED",
]

#: CACHE_VERSION changes whenever the stored layout changes, so stale entries are never read.
CACHE_VERSION = 1

#: label value of every voxel of an unlabelled case (label-free distillation): the engine replaces
#: such samples' labels by the teacher's argmax (``engine.merge_pseudo_labels``); never a class id
UNLABELLED = -1000


class SamplingError(ValueError):
    """A training case cannot be used as given (labels, shapes, patch size, cache)."""


# ---------------------------------------------------------------------------------------------
# Cases in memory


@dataclass
class TeacherTargets:
    """A frozen teacher's outputs on one whole preprocessed case (``engine.teacher_cache`` builds them).

    Attributes:
        logits: ``(K, D, H, W)`` (float16, usually memory-mapped), on the case's grid.
        features: per tap ``(C_l, ceil(D / s_l), ceil(H / s_l), ceil(W / s_l))``; empty when the KD
            methods read only logits.
        strides: per tap its stride ``(s_D, s_H, s_W)`` relative to the input.
    """

    logits: np.ndarray
    features: list[np.ndarray] = field(default_factory=list)
    strides: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.logits.ndim != 4:
            raise SamplingError(f"teacher logits must be (K, D, H, W), got shape {self.logits.shape}")
        if len(self.features) != len(self.strides):
            raise SamplingError(f"{len(self.features)} teacher feature maps but {len(self.strides)} strides")
        self.strides = [tuple(int(s) for s in stride) for stride in self.strides]  # type: ignore[misc]
        for feature, stride in zip(self.features, self.strides):
            expected = tuple(-(-n // s) for n, s in zip(self.logits.shape[1:], stride))
            if feature.ndim != 4 or tuple(feature.shape[1:]) != expected:
                raise SamplingError(f"a teacher feature map of stride {stride} must be (C, *{expected}) for logits "
                                    f"{tuple(self.logits.shape)}, got {tuple(feature.shape)}")

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes + sum(f.nbytes for f in self.features))


@dataclass
class CaseArrays:
    """One preprocessed training case.

    Attributes:
        case_id: name of the case (for messages and the cache).
        image: ``(C, D, H, W)`` float32, normalised, on the model's spacing.
        label: ``(1, D, H, W)`` integer class ids in ``[0, K)``.
        locations: per foreground class present, ``(N, 3)`` int voxel indices (at most
            ``max_locations`` per class, drawn once with a fixed seed) used for oversampling.
        meta: JSON-able record of the preprocessing (spacing, crop box, normalisation...).
        labelled: ``False`` for a case without annotation (its label is :data:`UNLABELLED`
            everywhere); found from the label when not given.
        teacher: the frozen teacher's outputs on this case (:class:`TeacherTargets`), or ``None``
            (the teacher then runs on every patch).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    locations: dict[int, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    labelled: bool | None = None
    teacher: TeacherTargets | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 4:
            raise SamplingError(f"case {self.case_id}: image must be (C, D, H, W), got shape {self.image.shape}")
        if self.label.ndim == 3:
            self.label = self.label[None]
        if self.label.ndim != 4 or self.label.shape[0] != 1 or self.label.shape[1:] != self.image.shape[1:]:
            raise SamplingError(
                f"case {self.case_id}: label must be (1, D, H, W) with the image's spatial size "
                f"{self.image.shape[1:]}, got {self.label.shape}"
            )
        if self.labelled is None:
            self.labelled = not bool(self.label.size) or int(np.asarray(self.label).min()) != UNLABELLED
        if not self.locations and self.labelled:
            self.locations = class_locations(self.label)
        if self.teacher is not None and tuple(self.teacher.logits.shape[1:]) != self.shape:
            raise SamplingError(f"case {self.case_id}: teacher logits {tuple(self.teacher.logits.shape)} are not on the "
                                f"case's grid {self.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])  # type: ignore[return-value]


@dataclass
class CaseSet:
    """Preprocessed cases plus what a model card needs to know about them.

    Attributes:
        cases: the preprocessed cases.
        class_names: index = label value, ``class_names[0]`` the background.
        spacing: voxel spacing in mm, ``(D, H, W)`` order.
        normalization: the normalisation record (see ``checkpoint.ModelCard``).
        source_hashes: optional ``{case_id: sha256 of its files}`` for provenance.
        label_spec: nnU-Net label semantics (``nnunet.labels.LabelSpec``: regions, ignore label)
            or ``None``; with an ignore label, labels hold -1 where it was.
    """

    cases: list[CaseArrays]
    class_names: list[str]
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    normalization: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    source_hashes: dict[str, str] = field(default_factory=dict)
    label_spec: Any = None

    def __post_init__(self) -> None:
        if not self.cases:
            raise SamplingError("a case set needs at least one case")
        channels = {c.image.shape[0] for c in self.cases}
        if len(channels) != 1:
            raise SamplingError(f"all cases need the same number of image channels, found {sorted(channels)}")
        if len(self.class_names) < 2:
            raise SamplingError(f"class_names must hold the background and >= 1 class, got {self.class_names}")
        ignored = getattr(self.label_spec, "ignore_label", None) is not None
        for case in self.cases:
            if case.labelled:
                check_label_values(case.label, len(self.class_names), case.case_id, allow_ignored=ignored)

    @property
    def unlabelled_cases(self) -> list[str]:
        """Ids of the cases without annotation (label-free distillation uses the teacher's argmax)."""
        return [c.case_id for c in self.cases if not c.labelled]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.cases[0].image.shape[0])

    def split(self, num_val: int) -> tuple["CaseSet", "CaseSet | None"]:
        """The first ``len - num_val`` cases for training, the last ``num_val`` held out.

        Deterministic (no shuffling): the held-out cases are the same in every run and resume.
        ``num_val = 0`` (or a single case) returns ``(self, None)``.
        """
        if num_val <= 0 or len(self.cases) < 2:
            return self, None
        if num_val >= len(self.cases):
            raise SamplingError(f"cannot hold out {num_val} of {len(self.cases)} cases; keep at least one for training")
        return self.with_cases(self.cases[:-num_val]), self.with_cases(self.cases[-num_val:])

    def with_cases(self, cases: Sequence[CaseArrays]) -> "CaseSet":
        """The same classes, spacing, normalisation, hashes and label semantics over ``cases``."""
        return CaseSet(list(cases), self.class_names, self.spacing, self.normalization, self.source_hashes,
                       label_spec=self.label_spec)


# ---------------------------------------------------------------------------------------------
# Checks


def check_label_values(label: np.ndarray, num_classes: int, case_id: str = "case", allow_empty: bool = False,
                       allow_ignored: bool = False) -> None:
    """Raise :class:`SamplingError` unless ``label`` holds integer ids in ``[0, num_classes)`` (and -1
    with ``allow_ignored``) and, unless ``allow_empty``, some foreground (the check of
    :mod:`~ReCoKDLib.data.preprocess`)."""
    from ReCoKDLib.data.preprocess import PreprocessingError
    from ReCoKDLib.data.preprocess import check_label_values as check

    try:
        check(label, num_classes, name=case_id, allow_empty=allow_empty, allow_ignored=allow_ignored)
    except PreprocessingError as exc:
        raise SamplingError(str(exc)) from None


def check_image_label(image: np.ndarray, image_geometry, label: np.ndarray, label_geometry, num_classes: int,
                      case_id: str = "case", allow_ignored: bool = False) -> None:
    """Check one raw case before preprocessing.

    Args:
        image: ``(D, H, W)`` or ``(C, D, H, W)``.
        image_geometry / label_geometry: ``ReCoKDLib.data.io.Geometry`` of each.
        label: ``(D, H, W)`` class ids.
        num_classes: ``K`` background included.

    Raises:
        ImageDimensionError: an input is 2D, or 4D where 3D is expected.
        GeometryError: image and label are not on the same voxel grid.
        SamplingError: label values outside the classes, or an empty label.
    """
    from ReCoKDLib.data.io import check_same_grid, require_3d

    require_3d(image, f"{case_id} image", allow_channels=True)
    require_3d(label, f"{case_id} label")
    check_same_grid(image_geometry, label_geometry, np.shape(image)[-3:], np.shape(label),
                    name_a=f"{case_id} image", name_b=f"{case_id} label")
    check_label_values(label, num_classes, case_id, allow_ignored=allow_ignored)


def load_raw_case(case, num_classes: int, allow_unlabelled: bool = False,
                  ignore_label: int | None = None) -> tuple[np.ndarray, Any, np.ndarray]:
    """Read and check a ``layout.Case`` (``case_id``, ``image_paths``, ``label_path``).

    ``ignore_label``: the nnU-Net ignore label's value; its voxels become -1
    (``nnunet.labels.mark_ignored``) and are left out of every loss and KD mask.

    ``allow_unlabelled``: a case without label file gets a label of :data:`UNLABELLED` everywhere
    (label-free distillation) instead of an error.

    Returns:
        ``(image (C, D, H, W) float32, geometry, label (D, H, W) int16)``.
    """
    from ReCoKDLib.data.io import check_same_grid, read_image, require_3d

    channels, geometry = [], None
    for i, path in enumerate(case.image_paths):
        array, geom = read_image(path)
        require_3d(array, f"{case.case_id} image channel {i} ({Path(path).name})")
        if geometry is None:
            geometry = geom
        else:
            check_same_grid(geometry, geom, channels[0].shape, array.shape,
                            name_a=f"{case.case_id} channel 0", name_b=f"{case.case_id} channel {i}")
        channels.append(np.asarray(array, dtype=np.float32))
    if not channels:
        raise SamplingError(f"{case.case_id}: the case lists no image file")
    if case.label_path is None:
        if allow_unlabelled:
            return np.stack(channels), geometry, np.full(channels[0].shape, UNLABELLED, np.int16)
        raise SamplingError(f"{case.case_id}: the case has no label file; training needs labelled cases "
                            "(distillation can use unlabelled cases: recokd distill --no-labels / --images)")
    label, label_geometry = read_image(case.label_path)
    image = np.stack(channels)
    if ignore_label is not None:
        from ReCoKDLib.nnunet.labels import mark_ignored

        label = mark_ignored(label, ignore_label)
    check_image_label(image, geometry, label, label_geometry, num_classes, case.case_id,
                      allow_ignored=ignore_label is not None)
    return image, geometry, np.asarray(label).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# Cache


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else None
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    return str(value)


def cache_key(file_hashes: Sequence[str], params: Mapping[str, Any]) -> str:
    """Hex key (24 chars) of the source files' SHA-256 and the preprocessing parameters."""
    text = json.dumps({"v": CACHE_VERSION, "files": list(file_hashes), "params": _jsonable(params)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class CaseCache:
    """Preprocessed cases on disk: ``<root>/<key>/{image.npy, label.npy, meta.json}``.

    An entry is written into a temporary folder and renamed into place, so an interrupted run
    never leaves half an entry; an unreadable entry is rebuilt.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> CaseArrays | None:
        folder = self.path(key)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            image = np.load(folder / "image.npy", mmap_mode="r")
            label = np.load(folder / "label.npy", mmap_mode="r")
            with np.load(folder / "locations.npz") as npz:
                locations = {int(k): npz[k] for k in npz.files}
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        return CaseArrays(meta["case_id"], image, label, locations, meta, meta.get("labelled"))

    def store(self, key: str, case: CaseArrays) -> CaseArrays:
        """Write an entry (atomically, see the class docstring).

        Raises:
            OutputWriteError: the cache cannot be written (a full disk, no permission); the message
                names the cache folder and ``--cache-dir``.
        """
        from ReCoKDLib.checkpoint import OutputWriteError, create_temp_dir

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = create_temp_dir(self.root, prefix=f".{key}.")
        except OSError as exc:
            raise self._write_error(key, exc) from exc
        try:
            np.save(tmp / "image.npy", np.ascontiguousarray(case.image, dtype=np.float32))
            np.save(tmp / "label.npy", np.ascontiguousarray(case.label, dtype=np.int16))
            np.savez(tmp / "locations.npz", **{str(k): v for k, v in case.locations.items()})
            meta = dict(case.meta, case_id=case.case_id, cache_version=CACHE_VERSION, labelled=case.labelled)
            (tmp / "meta.json").write_text(json.dumps(_jsonable(meta), indent=1, sort_keys=True))
            target = self.path(key)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
                raise self._write_error(key, exc) from exc
            raise
        return self.load(key) or case

    def _write_error(self, key: str, exc: OSError):
        from ReCoKDLib.checkpoint import OutputWriteError

        error = OutputWriteError.of(self.path(key), exc)
        return OutputWriteError(error.errno, f"{error}; the preprocessing cache can go to another disk with "
                                             "--cache-dir DIR", error.filename)


def _preprocessed_arrays(result: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(image, label, meta)`` of a ``PreprocessedCase`` (or any object/dict with image and label)."""
    get = result.get if isinstance(result, Mapping) else (lambda k, d=None: getattr(result, k, d))
    image, label = get("image"), get("label")
    if image is None or label is None:
        raise SamplingError("the preprocessing function must return an object with .image and .label arrays")
    names = result.keys() if isinstance(result, Mapping) else (
        [f.name for f in fields(result)] if is_dataclass(result) else vars(result).keys())
    meta = {k: _jsonable(get(k)) for k in names if k not in ("image", "label")}
    return np.asarray(image, dtype=np.float32), np.asarray(label), meta


def _preprocess_identity(preprocess: Callable[..., Any]) -> str:
    """Name and version of a preprocessing function, part of the cache key: a new version of the
    preprocessing (its module's ``PREPROCESSING_VERSION``) never reuses cases cached by an old one."""
    module = sys.modules.get(getattr(preprocess, "__module__", ""), None)
    version = getattr(module, "PREPROCESSING_VERSION", "")
    return f"{getattr(preprocess, '__module__', '?')}.{getattr(preprocess, '__qualname__', repr(preprocess))}:{version}"


def prepare_cases(
    cases: Sequence[Any],
    class_names: Sequence[str],
    preprocess: Callable[..., Any],
    params: Mapping[str, Any],
    cache_dir: str | os.PathLike | None = None,
    on_case: Callable[[int, int, str, bool], None] | None = None,
    allow_unlabelled: bool = False,
    label_spec: Any = None,
) -> CaseSet:
    """Read, check, preprocess (once, cached) every training case.

    Args:
        cases: ``layout.Case`` objects (``case_id``, ``image_paths``, ``label_path``).
        class_names: the classes, background first.
        preprocess: ``preprocess(image, geometry, target_spacing, normalization, label=...)``
            returning an object with ``image (C, D, H, W)`` and ``label (1, D, H, W)``.
        params: ``{"spacing": [...], "normalization": {...}}`` (and anything else that changes
            the result: it is part of the cache key).
        cache_dir: folder of the cache; ``None`` keeps everything in memory only.
        on_case: called ``(index, total, case_id, from_cache)`` after each case (progress).
        allow_unlabelled: cases without a label file are kept, labelled :data:`UNLABELLED`
            everywhere (for label-free distillation); otherwise they are an error.
        label_spec: nnU-Net label semantics (``nnunet.labels.LabelSpec``, e.g. ``RawDataset.label_spec``):
            voxels of its ignore label become -1; kept on the returned :class:`CaseSet`.
    """
    from ReCoKDLib.checkpoint import sha256_file

    ignore_label = getattr(label_spec, "ignore_label", None)
    if ignore_label is not None:
        params = {**params, "ignore_label": int(ignore_label)}  # part of the cache key

    cache = CaseCache(cache_dir) if cache_dir is not None else None
    out, hashes = [], {}
    for index, case in enumerate(cases):
        files = [*case.image_paths, case.label_path]
        file_hashes = [sha256_file(p) for p in files if p is not None]
        hashes[case.case_id] = hashlib.sha256("".join(file_hashes).encode()).hexdigest()
        key = cache_key(file_hashes, {**params, "preprocess": _preprocess_identity(preprocess)})
        loaded = cache.load(key) if cache is not None else None
        if loaded is None:
            image, geometry, label = load_raw_case(case, len(class_names), allow_unlabelled, ignore_label)
            labelled = case.label_path is not None
            if labelled:
                result = preprocess(image, geometry, params["spacing"], params["normalization"], label=label)
                p_image, p_label, meta = _preprocessed_arrays(result)
                check_label_values(p_label, len(class_names), f"{case.case_id} (after preprocessing)",
                                   allow_ignored=ignore_label is not None)
            else:
                result = preprocess(image, geometry, params["spacing"], params["normalization"], label=label * 0)
                p_image, _, meta = _preprocessed_arrays(result)
                p_label = np.full((1, *p_image.shape[1:]), UNLABELLED, np.int16)
            loaded = CaseArrays(case.case_id, p_image, p_label.astype(np.int16), meta=meta, labelled=labelled)
            if cache is not None:
                loaded = cache.store(key, loaded)
            from_cache = False
        else:
            from_cache = True
        out.append(loaded)
        if on_case is not None:
            on_case(index + 1, len(cases), case.case_id, from_cache)
    return CaseSet(out, list(class_names), list(params["spacing"]), dict(params["normalization"]), hashes,
                   label_spec=label_spec)


# ---------------------------------------------------------------------------------------------
# Sampling


def class_locations(label: np.ndarray, max_per_class: int = 10000, seed: int = 1234) -> dict[int, np.ndarray]:
    """Voxel indices ``(N, 3)`` (D, H, W) of every foreground class in ``label`` ``(1, D, H, W)``.

    At most ``max_per_class`` per class, subsampled with a fixed ``seed`` so the result depends on
    the label only (as nnU-Net's ``class_locations``).
    """
    lab = np.asarray(label)[0]
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for value in np.unique(lab):
        if value <= 0:
            continue
        coords = np.argwhere(lab == value)
        if len(coords) > max_per_class:
            coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
        out[int(value)] = coords.astype(np.int32)
    return out


def crop_with_padding(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float = 0) -> np.ndarray:
    """Crop ``array`` ``(C, D, H, W)`` at spatial ``start`` (may be negative or run past the end) to ``size``.

    The part outside the volume is filled with ``pad_value``.
    """
    spatial = array.shape[1:]
    lo = [max(0, s) for s in start]
    hi = [min(n, s + z) for n, s, z in zip(spatial, start, size)]
    crop = np.asarray(array[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))])
    pad = [(0, 0)] + [(a - s, s + z - b) for s, a, b, z in zip(start, lo, hi, size)]
    if any(p != (0, 0) for p in pad):
        crop = np.pad(crop, pad, mode="constant", constant_values=pad_value)
    return crop


@dataclass
class AugmentationConfig:
    """nnU-Net-like augmentation (probabilities per patch). ``enabled=False`` turns all off."""

    enabled: bool = True
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.25)
    p_affine: float = 0.2
    flip_axes: tuple[int, ...] = ()
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_brightness: float = 0.15
    brightness: float = 0.25
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AugmentationConfig":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise SamplingError(f"unknown augmentation options {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        data = dict(data)
        for key in ("scale", "flip_axes", "gamma"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class AugmentationDraw:
    """The random choices of one patch's augmentation (:func:`draw_augmentation`).

    Attributes:
        rotate: radians about each axis, or ``None`` (no affine transform this time).
        scale: scaling factor per axis (MONAI ``Affine`` ``scale_params``: > 1 samples a larger region).
        flips: spatial axes (0 = D, 1 = H, 2 = W) flipped.
        intensity_seed: seed of the intensity transforms (image only).
    """

    rotate: tuple[float, float, float] | None = None
    scale: tuple[float, float, float] | None = None
    flips: tuple[int, ...] = ()
    intensity_seed: int = 0

    @property
    def spatial(self) -> bool:
        return self.rotate is not None or bool(self.flips)


def draw_augmentation(config: AugmentationConfig, rng: np.random.Generator) -> AugmentationDraw:
    """One patch's augmentation drawn from ``rng`` (the same number of draws whatever the outcome,
    so the stream of patches never depends on which transforms fired)."""
    rad = float(np.deg2rad(config.rotate_deg))
    affine = bool(rng.random() < config.p_affine)
    rotate = tuple(float(a) for a in rng.uniform(-rad, rad, 3))
    scale = tuple(float(s) for s in rng.uniform(config.scale[0], config.scale[1], 3))
    flips = tuple(int(a) for a in config.flip_axes if rng.random() < 0.5)
    seed = int(rng.integers(2**31 - 1))
    return AugmentationDraw(rotate if affine else None, scale if affine else None, flips, seed)  # type: ignore[arg-type]


def spatial_matrix(draw: AugmentationDraw) -> np.ndarray:
    """The ``(3, 3)`` map from output to input voxel offsets about the centre, ``(D, H, W)`` order:
    rotations about the D, H and W axes, then scaling (a factor > 1 samples a larger region)."""
    if draw.rotate is None:
        return np.eye(3)
    a, b, c = draw.rotate
    rot_d = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rot_h = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rot_w = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rot_d @ rot_h @ rot_w @ np.diag(draw.scale)


class SpatialTransform:
    """The spatial part of one :class:`AugmentationDraw`, applied to arrays ``(C, D, H, W)`` of any size:
    rotation and scaling about the centre (``torch.nn.functional.grid_sample``, zeros outside), then flips.

    The transform acts on voxel offsets from the array's centre, so the same draw gives the same
    geometric transform on any grid covering the patch's box at another resolution (a teacher feature
    map at stride ``s`` of a patch whose size is a multiple of ``s``: its centre is the patch's centre,
    its voxels ``s`` times larger). The sampling grid of each size is built once per draw.
    """

    def __init__(self, draw: AugmentationDraw) -> None:
        self.draw = draw
        self._grids: dict[tuple[int, ...], torch.Tensor] = {}

    def _grid(self, shape: Sequence[int]) -> torch.Tensor:
        key = tuple(int(s) for s in shape)
        if key not in self._grids:
            size = np.array(key, dtype=float)
            # normalised coordinates (align_corners=False) are offsets / (size / 2): conjugate by the size
            theta = np.diag(1.0 / size) @ spatial_matrix(self.draw) @ np.diag(size)
            theta = theta[::-1, ::-1].copy()  # (D, H, W) -> grid_sample's (x, y, z) = (W, H, D)
            affine = torch.zeros(1, 3, 4)
            affine[0, :, :3] = torch.from_numpy(theta).float()
            self._grids[key] = torch.nn.functional.affine_grid(affine, [1, 1, *key], align_corners=False)
        return self._grids[key]

    def __call__(self, array: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``array`` ``(C, D, H, W)`` transformed; ``mode``: ``"bilinear"`` (trilinear: images, logits,
        features) or ``"nearest"`` (labels)."""
        out = array.float()
        if self.draw.rotate is not None:
            grid = self._grid(out.shape[1:])
            out = torch.nn.functional.grid_sample(out[None], grid, mode=mode, padding_mode="zeros",
                                                  align_corners=False)[0]
        if self.draw.flips:
            out = torch.flip(out, [a + 1 for a in self.draw.flips])
        return out


def apply_spatial(array: torch.Tensor, draw: AugmentationDraw, mode: str) -> torch.Tensor:
    """:class:`SpatialTransform` of ``draw`` on one array ``(C, D, H, W)``."""
    return SpatialTransform(draw)(array, mode)


def _intensity_transforms(config: AugmentationConfig):
    """MONAI intensity transforms (image only): Gaussian noise, multiplicative brightness, gamma."""
    from monai import transforms as T

    return T.Compose([
        T.RandGaussianNoise(prob=config.p_noise, std=config.noise_std),
        T.RandScaleIntensity(factors=config.brightness, prob=config.p_brightness),
        T.RandAdjustContrast(prob=config.p_gamma, gamma=config.gamma),
    ])


def _as_plain_tensor(x) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x


@dataclass
class PatchBatch:
    """One training batch (:meth:`PatchSampler.draw`).

    Attributes:
        images: ``(B, C, *patch)`` float32, augmented.
        labels: ``(B, 1, *patch)`` int64 (:data:`UNLABELLED` for unannotated cases).
        teacher_logits: ``(B, K, *patch)`` float32 from the cases' :class:`TeacherTargets`, or ``None``.
        teacher_features: per tap ``(B, C_l, *patch / s_l)`` float32 (empty without cached features).
    """

    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    teacher_features: list[torch.Tensor] = field(default_factory=list)


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * int(v) // int(np.gcd(out, int(v)))
    return out


class PatchSampler:
    """Draws augmented training batches from a :class:`CaseSet`, deterministically from ``seed``.

    Args:
        case_set: the training cases; when they carry :class:`TeacherTargets` (all or none), the
            teacher's outputs are cropped and augmented with each patch.
        patch_size: ``(D, H, W)`` in voxels (a multiple of every cached feature stride).
        oversample_foreground: share of patches centred on a foreground voxel (nnU-Net: 0.33).
        augmentation: an :class:`AugmentationConfig` (``None`` = none).
        seed: seed of the sampler's own ``numpy.random.Generator``.

    Example:
        >>> sampler = PatchSampler(cases, (32, 32, 32), seed=0)       # doctest: +SKIP
        >>> images, labels = sampler.batch(2)  # (2, C, 32, 32, 32) float32, (2, 1, 32, 32, 32) int64
    """

    def __init__(
        self,
        case_set: CaseSet,
        patch_size: Sequence[int],
        oversample_foreground: float = 0.33,
        augmentation: AugmentationConfig | None = None,
        seed: int = 0,
    ) -> None:
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise SamplingError(f"patch_size must be 3 positive ints (D, H, W), got {patch_size}")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise SamplingError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        self.cases = case_set.cases
        self.oversample_foreground = float(oversample_foreground)
        self.rng = np.random.default_rng(seed)
        self.augmentation = augmentation if augmentation is not None and augmentation.enabled else None
        self._intensity = _intensity_transforms(self.augmentation) if self.augmentation is not None else None
        with_targets = {c.teacher is not None for c in self.cases}
        if len(with_targets) > 1:
            raise SamplingError("either every case carries the teacher's cached outputs or none does")
        self.with_targets = with_targets == {True}
        strides = self.cases[0].teacher.strides if self.with_targets else []  # type: ignore[union-attr]
        #: patch starts are multiples of this per axis (exact crops of the cached feature maps)
        self.align = tuple(_lcm([s[axis] for s in strides]) for axis in range(3))
        self.patch_size = patch

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self._patch_size

    @patch_size.setter
    def patch_size(self, patch: Sequence[int]) -> None:
        patch = tuple(int(p) for p in patch)
        bad = [(p, a) for p, a in zip(patch, self.align) if p % a]
        if bad:
            raise SamplingError(f"patch_size {patch} must be a multiple of the cached teacher features' strides "
                                f"{self.align} per axis")
        self._patch_size = patch  # type: ignore[assignment]

    # state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The generator's state (plain ints and strings: safe for ``weights_only`` loading)."""
        return {"bit_generator": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["bit_generator"])

    # sampling -------------------------------------------------------------------------------
    def _start(self, case: CaseArrays, force_foreground: bool) -> list[int]:
        """Patch start per axis (a multiple of :attr:`align`); may be negative or run past the end (then padded)."""
        shape = case.shape
        need = [max(p - s, 0) for p, s in zip(self.patch_size, shape)]
        lows = [-(n // 2) for n in need]
        highs = [s + n // 2 + n % 2 - p for s, n, p in zip(shape, need, self.patch_size)]
        classes = sorted(case.locations)
        if force_foreground and classes:
            cls = classes[int(self.rng.integers(len(classes)))]
            coords = case.locations[cls]
            centre = coords[int(self.rng.integers(len(coords)))]
            start = [int(min(max(c - p // 2, lo), hi)) for c, p, lo, hi in zip(centre, self.patch_size, lows, highs)]
        else:
            start = [int(self.rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs)]
        return [s - s % a for s, a in zip(start, self.align)]

    def _crop(self, case: CaseArrays, start: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Image ``(C, *patch)`` float32, label ``(1, *patch)``, and the teacher's logits and features
        cropped at the same box (``[]`` without targets); outside the volume: zeros (labels 0)."""
        image = np.array(crop_with_padding(case.image, start, self.patch_size, 0.0), dtype=np.float32)  # a copy
        label = np.array(crop_with_padding(case.label, start, self.patch_size, 0))
        targets: list[np.ndarray] = []
        if case.teacher is not None:
            targets.append(crop_with_padding(case.teacher.logits, start, self.patch_size, 0.0))
            for feature, stride in zip(case.teacher.features, case.teacher.strides):
                targets.append(crop_with_padding(feature, [a // s for a, s in zip(start, stride)],
                                                 [p // s for p, s in zip(self.patch_size, stride)], 0.0))
        return image, label, targets

    def _next_crop(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        case = self.cases[int(self.rng.integers(len(self.cases)))]
        force_foreground = bool(self.rng.random() < self.oversample_foreground)
        return self._crop(case, self._start(case, force_foreground))

    def sample(self, case: CaseArrays | None = None, force_foreground: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One un-augmented patch: ``(C, *patch)`` float32 image and ``(1, *patch)`` int16 label."""
        if case is None:
            case = self.cases[int(self.rng.integers(len(self.cases)))]
        if force_foreground is None:
            force_foreground = bool(self.rng.random() < self.oversample_foreground)
        image, label, _ = self._crop(case, self._start(case, force_foreground))
        return image, label

    def draw(self, batch_size: int) -> PatchBatch:
        """A batch of augmented patches, with the teacher's cached outputs when the cases carry them.

        Each patch gets one :func:`draw_augmentation`: its spatial part is applied to the image
        (bilinear), the labels (nearest) and the teacher's logits and features (bilinear); its
        intensity part to the image only.
        """
        images, labels, targets = [], [], []
        for _ in range(batch_size):
            image, label, teacher = self._next_crop()
            image_t = torch.from_numpy(image)
            label_t = torch.from_numpy(label.astype(np.float32))
            teacher_t = [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in teacher]
            if self.augmentation is not None:
                draw = draw_augmentation(self.augmentation, self.rng)
                if draw.spatial:
                    spatial = SpatialTransform(draw)
                    if teacher_t:  # image and logits share a grid: one resampling pass
                        joint = spatial(torch.cat([image_t, teacher_t[0]]), "bilinear")
                        image_t, teacher_t[0] = joint[:image_t.shape[0]], joint[image_t.shape[0]:]
                        teacher_t[1:] = [spatial(a, "bilinear") for a in teacher_t[1:]]
                    else:
                        image_t = spatial(image_t, "bilinear")
                    label_t = spatial(label_t, "nearest")
                self._intensity.set_random_state(seed=draw.intensity_seed)
                image_t = _as_plain_tensor(self._intensity(image_t))
            images.append(image_t.float())
            labels.append(label_t.round().long())
            targets.append(teacher_t)
        if not self.with_targets:
            return PatchBatch(torch.stack(images), torch.stack(labels))
        levels = [torch.stack([t[i] for t in targets]) for i in range(len(targets[0]))]
        return PatchBatch(torch.stack(images), torch.stack(labels), levels[0], levels[1:])

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, *patch)`` float32 images and ``(B, 1, *patch)`` int64 labels, augmented."""
        drawn = self.draw(batch_size)
        return drawn.images, drawn.labels
