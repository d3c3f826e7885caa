"""Datasets in the nnU-Net v2 raw layout, or from a plain list of (image, label) pairs.

Layout (see nnU-Net's ``dataset_format.md``)::

    DatasetNNN_Name/
        dataset.json      {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, ...},
                           "numTraining": N, "file_ending": ".nii.gz", ...}
        imagesTr/         CASE_0000.nii.gz (one file per channel: _0000, _0001, ...)
        labelsTr/         CASE.nii.gz
        imagesTs/         optional, same naming
        labelsTs/         optional (ReCoKD's convention for held-out test labels)

:class:`RawDataset` reads and checks it; :meth:`RawDataset.from_pairs` wraps files that are not in
that layout. Every problem raises :class:`DatasetLayoutError` saying what was expected.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ReCoKDLib.data.io import GeometryError, ImageDimensionError, ImageReadError, check_same_grid, image_suffix, read_image

__all__ = ["Case", "RawDataset", "DatasetLayoutError", "write_dataset_json", "dataset_json_dict"]


class DatasetLayoutError(ValueError):
    """A dataset folder, its dataset.json or its files are not what the nnU-Net raw layout expects."""


@dataclass(frozen=True)
class Case:
    """One case: a channel file per input channel (in channel order) and an optional label file."""

    case_id: str
    image_paths: list[Path]
    label_path: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_paths", [Path(p) for p in self.image_paths])
        if self.label_path is not None:
            object.__setattr__(self, "label_path", Path(self.label_path))


def _atomic_write_text(path: Path, text: str) -> None:
    from ReCoKDLib.checkpoint import atomic_write_text

    atomic_write_text(path, text)


def dataset_json_dict(
    channel_names: Mapping[int | str, str] | Sequence[str],
    labels: Mapping[str, int] | Sequence[str],
    num_training: int,
    file_ending: str = ".nii.gz",
    **extra: Any,
) -> dict[str, Any]:
    """The ``dataset.json`` content. ``labels`` is ``{name: id}`` or a list of names in id order
    (first = background, id 0); ``channel_names`` is ``{index: name}`` or a list."""
    if not isinstance(channel_names, Mapping):
        channel_names = {i: n for i, n in enumerate(channel_names)}
    if not isinstance(labels, Mapping):
        labels = {n: i for i, n in enumerate(labels)}
    data = {
        "channel_names": {str(k): str(v) for k, v in channel_names.items()},
        "labels": {str(k): ([int(x) for x in v] if isinstance(v, (list, tuple)) else int(v))  # lists: nnU-Net regions
                   for k, v in labels.items()},
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    data.update(extra)
    _check_labels_mapping(data["labels"], "dataset.json", data.get("regions_class_order"))
    return data


def write_dataset_json(
    folder: str | os.PathLike,
    channel_names: Mapping[int | str, str] | Sequence[str],
    labels: Mapping[str, int] | Sequence[str],
    num_training: int,
    file_ending: str = ".nii.gz",
    **extra: Any,
) -> Path:
    """Write ``folder/dataset.json`` atomically (see :func:`dataset_json_dict`); returns its path."""
    data = dataset_json_dict(channel_names, labels, num_training, file_ending, **extra)
    path = Path(folder) / "dataset.json"
    _atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _check_labels_mapping(labels: Mapping[str, Any], where: str,
                          regions_class_order: Sequence[int] | None = None) -> dict[str, int]:
    """``{name: value}`` of every label value a label file may hold (the ignore label excluded).

    nnU-Net region-based labels (lists of values, with ``regions_class_order``) and the ``ignore``
    label are read with :func:`ReCoKDLib.nnunet.labels.parse_labels`; a value no entry names alone
    is called ``label_<value>``.
    """
    if "ignore" in labels or any(isinstance(v, (list, tuple)) for v in labels.values()):
        from ReCoKDLib.nnunet.labels import LabelSpecError, parse_labels

        try:
            spec = parse_labels(labels, regions_class_order, where)
        except LabelSpecError as exc:
            raise DatasetLayoutError(str(exc)) from None
        return {name: value for value, name in enumerate(spec.value_names)}
    out: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DatasetLayoutError(
                f"{where}: label {name!r} is a region ({value}); region-based labels are not supported, "
                "use one integer id per class")
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise DatasetLayoutError(f"{where}: label {name!r} must map to an integer id; got {value!r}")
        out[str(name)] = int(value)
    ids = sorted(out.values())
    if ids != list(range(len(ids))):
        raise DatasetLayoutError(
            f"{where}: label ids must be consecutive 0..{len(ids) - 1} with 0 = background; got {ids}")
    if len(ids) < 2:
        raise DatasetLayoutError(f"{where}: needs background (0) and at least one class; got {out}")
    return out


@dataclass
class RawDataset:
    """A labelled 3D dataset: nnU-Net v2 raw folder or an explicit list of cases.

    Use :meth:`open` for a folder and :meth:`from_pairs` for a plain list of files.
    """

    root: Path | None
    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str
    train: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, labels_required: bool = True) -> "RawDataset":
        """Read ``folder/dataset.json`` and list the training and test cases.

        ``labels_required=False`` (distillation without labels) accepts training cases without a
        label file in ``labelsTr/`` (their ``Case.label`` is ``None``).

        Raises:
            DatasetLayoutError: missing folder or dataset.json, malformed json, a case missing a
                channel file or its label, or fewer training cases than ``numTraining``.
        """
        root = Path(folder)
        if not root.is_dir():
            raise DatasetLayoutError(f"dataset folder not found: {root}")
        json_path = root / "dataset.json"
        if not json_path.is_file():
            raise DatasetLayoutError(
                f"{root} has no dataset.json; an nnU-Net raw dataset needs dataset.json, imagesTr/ and labelsTr/ "
                "(or build one from file pairs with RawDataset.from_pairs)")
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetLayoutError(f"{json_path} is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise DatasetLayoutError(f"{json_path} must hold a JSON object (channel_names, labels, file_ending, ...); "
                                     f"got a {type(meta).__name__}")
        for key in ("channel_names", "labels", "file_ending"):
            if key not in meta:
                raise DatasetLayoutError(f"{json_path} lacks the required key {key!r}")
        for key, example in (("channel_names", '{"0": "CT"}'), ("labels", '{"background": 0, "liver": 1}')):
            if not isinstance(meta[key], dict):
                raise DatasetLayoutError(
                    f"{json_path}: {key!r} must be a JSON object like {example} (name or index -> value); got a "
                    f"{type(meta[key]).__name__}: {json.dumps(meta[key])[:80]}")
        channel_names = {str(k): str(v) for k, v in meta["channel_names"].items()}
        if not channel_names or not all(k.isdigit() for k in channel_names) or sorted(
                int(k) for k in channel_names) != list(range(len(channel_names))):
            raise DatasetLayoutError(f"{json_path}: channel_names keys must be 0..C-1; got {list(channel_names)}")
        labels = _check_labels_mapping(meta["labels"], str(json_path), meta.get("regions_class_order"))
        ending = str(meta["file_ending"])
        n_channels = len(channel_names)
        train = cls._scan(root / "imagesTr", root / "labelsTr", ending, n_channels, label_required=labels_required)
        test = cls._scan(root / "imagesTs", root / "labelsTs", ending, n_channels, label_required=False)
        if not train and not (root / "imagesTr").is_dir():
            raise DatasetLayoutError(f"{root} has no imagesTr/ folder")
        n_declared = meta.get("numTraining")
        if n_declared is not None and int(n_declared) != len(train):
            raise DatasetLayoutError(
                f"{json_path} declares numTraining={n_declared} but imagesTr/ holds {len(train)} cases")
        return cls(root, channel_names, labels, ending, train, test, meta)

    @staticmethod
    def _scan(images: Path, labels: Path, ending: str, n_channels: int, label_required: bool) -> list[Case]:
        if not images.is_dir():
            return []
        pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
        channels: dict[str, dict[int, Path]] = {}
        for path in sorted(images.iterdir()):
            if path.name.startswith("."):
                continue  # temporary / hidden files
            match = pattern.match(path.name)
            if match is None:
                if path.name.endswith(ending):
                    raise DatasetLayoutError(
                        f"{path}: image files must be named CASE_XXXX{ending} (XXXX = 4-digit channel index)")
                continue
            channels.setdefault(match["case"], {})[int(match["ch"])] = path
        cases = []
        for case_id, files in sorted(channels.items()):
            missing = [c for c in range(n_channels) if c not in files]
            if missing:
                raise DatasetLayoutError(
                    f"case {case_id!r} in {images} lacks channel file(s) "
                    + ", ".join(f"{case_id}_{c:04d}{ending}" for c in missing))
            extra = sorted(set(files) - set(range(n_channels)))
            if extra:
                raise DatasetLayoutError(
                    f"case {case_id!r} in {images} has channel(s) {extra} beyond the {n_channels} declared in dataset.json")
            label = labels / f"{case_id}{ending}"
            if not label.is_file():
                if label_required:
                    raise DatasetLayoutError(f"case {case_id!r} has no label file {label}")
                label = None
            cases.append(Case(case_id, [files[c] for c in range(n_channels)], label))
        return cases

    @classmethod
    def from_pairs(
        cls,
        pairs: Iterable[tuple[str | os.PathLike | Sequence[str | os.PathLike], str | os.PathLike | None]],
        class_names: Sequence[str],
        test_pairs: Iterable[tuple[Any, Any]] = (),
        channel_names: Sequence[str] = ("image",),
        case_ids: Sequence[str] | None = None,
    ) -> "RawDataset":
        """A dataset from plain ``(image, label)`` file pairs (no nnU-Net folder needed).

        Args:
            pairs: training ``(image, label)``; ``image`` is a path, or a list of one path per
                channel. Any format :func:`~ReCoKDLib.data.io.read_image` reads (a DICOM folder too).
            class_names: names in id order, background first (``["background", "liver", ...]``).
            test_pairs: held-out ``(image, label or None)``.
            channel_names: one name per input channel.
            case_ids: optional ids for the training pairs (default: ``case_000``, ...).
        """
        names = list(class_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise DatasetLayoutError(f"class_names needs background plus >= 1 class, all distinct; got {names}")
        labels = {n: i for i, n in enumerate(names)}
        n_ch = len(channel_names)

        def to_cases(items, prefix, ids=None, label_required=True):
            cases = []
            for n, (image, label) in enumerate(items):
                images = [image] if isinstance(image, (str, os.PathLike)) else list(image)
                if len(images) != n_ch:
                    raise DatasetLayoutError(f"{prefix} pair {n}: {len(images)} image file(s) for {n_ch} channel(s)")
                for p in images + ([label] if label is not None else []):
                    if not Path(p).exists():
                        raise DatasetLayoutError(f"{prefix} pair {n}: file not found: {p}")
                if label is None and label_required:
                    raise DatasetLayoutError(f"{prefix} pair {n}: training cases need a label")
                case_id = ids[n] if ids is not None else f"{prefix}_{n:03d}"
                cases.append(Case(case_id, [Path(p) for p in images], Path(label) if label is not None else None))
            return cases

        pairs = list(pairs)
        if case_ids is not None and len(case_ids) != len(pairs):
            raise DatasetLayoutError(f"{len(case_ids)} case ids for {len(pairs)} pairs")
        train = to_cases(pairs, "case", case_ids)
        if not train:
            raise DatasetLayoutError("from_pairs needs at least one (image, label) training pair")
        test = to_cases(list(test_pairs), "test", label_required=False)
        endings = {image_suffix(c.image_paths[0]) or "<dicom folder>" for c in train + test}
        return cls(None, {str(i): n for i, n in enumerate(channel_names)}, labels,
                   endings.pop() if len(endings) == 1 else "", train, test, {"numTraining": len(train)})

    # -- queries --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.name if self.root is not None else str(self.meta.get("name", "pairs"))

    @property
    def label_spec(self):
        """nnU-Net label semantics of ``dataset.json`` (``nnunet.labels.LabelSpec``: regions,
        ``regions_class_order``, ignore label), or ``None`` for datasets built from pairs."""
        if "labels" not in self.meta:
            return None
        from ReCoKDLib.nnunet.labels import label_spec_from_dataset_json

        return label_spec_from_dataset_json(self.meta, str(self.root / "dataset.json") if self.root else "dataset.json")

    @property
    def ignore_label(self) -> int | None:
        """The value of dataset.json's ``ignore`` label (voxels left out of every loss), or ``None``."""
        spec = self.label_spec
        return spec.ignore_label if spec is not None else None

    @property
    def class_names(self) -> list[str]:
        """Label names ordered by id (index 0 = background)."""
        return [n for n, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def training_cases(self) -> list[Case]:
        return list(self.train)

    def test_cases(self) -> list[Case]:
        return list(self.test)

    def load_case(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, Any]:
        """Read a case: ``(image (C, D, H, W) float32, label (D, H, W) int or None, Geometry)``.

        Checks that every channel and the label share the first channel's grid.
        """
        arrays, geometry, shape = [], None, None
        for path in case.image_paths:
            array, geo = read_image(path, allow_channels=False)
            if geometry is None:
                geometry, shape = geo, array.shape
            else:
                check_same_grid(geometry, geo, shape, array.shape, str(case.image_paths[0]), str(path))
            arrays.append(array.astype(np.float32, copy=False))
        label = None
        if case.label_path is not None:
            label, geo = read_image(case.label_path, allow_channels=False)
            check_same_grid(geometry, geo, shape, label.shape, str(case.image_paths[0]), str(case.label_path))
            if not np.issubdtype(label.dtype, np.integer):
                rounded = np.rint(label)
                if not np.array_equal(rounded, label):
                    raise DatasetLayoutError(f"{case.label_path}: label map has non-integer values")
                label = rounded.astype(np.int16)
        return np.stack(arrays), label, geometry

    # -- validation -----------------------------------------------------------------------------
    def validate(self, check_labels: bool = True, check_geometry: bool = True) -> None:
        """Check the dataset thoroughly.

        With ``check_labels`` every label file is read and its values must be declared ids; with
        ``check_geometry`` every channel and label must share the case's grid.

        Raises:
            DatasetLayoutError: the first problem found, naming the file and what was expected.
        """
        if not self.train:
            raise DatasetLayoutError(f"{self.name}: no training cases")
        allowed = set(self.labels.values()) | ({self.ignore_label} if self.ignore_label is not None else set())
        for case in self.train + self.test:
            for path in case.image_paths + ([case.label_path] if case.label_path else []):
                if not Path(path).exists():
                    raise DatasetLayoutError(f"case {case.case_id!r}: file not found: {path}")
            if not (check_labels or check_geometry):
                continue
            try:
                if check_geometry:
                    _, label, _ = self.load_case(case)
                else:
                    label = read_image(case.label_path, allow_channels=False)[0] if case.label_path else None
            except (GeometryError, ImageDimensionError, ImageReadError) as exc:
                raise DatasetLayoutError(f"case {case.case_id!r}: {exc}") from None
            if check_labels and label is not None:
                values = set(np.unique(label).tolist())
                unknown = sorted(values - allowed)
                if unknown:
                    raise DatasetLayoutError(
                        f"{case.label_path}: label values {unknown[:10]} are not declared in dataset.json "
                        f"(declared ids {sorted(allowed)}: {self.class_names})")

    def summary(self) -> dict[str, Any]:
        """Cases, classes, spacing and sizes (reads image headers only)."""
        import SimpleITK as sitk

        info: dict[str, Any] = {
            "name": self.name,
            "root": str(self.root) if self.root else None,
            "num_train": len(self.train),
            "num_test": len(self.test),
            "classes": self.class_names,
            "channels": [self.channel_names[k] for k in sorted(self.channel_names, key=int)],
            "cases": [],
        }
        for split, cases in (("train", self.train), ("test", self.test)):
            for case in cases:
                first = case.image_paths[0]
                if first.is_dir():  # a DICOM series given through from_pairs
                    array, geometry = read_image(first)
                    size, spacing = list(array.shape[-3:]), list(geometry.spacing)
                else:
                    reader = sitk.ImageFileReader()
                    reader.SetFileName(str(first))
                    reader.ReadImageInformation()
                    size, spacing = list(reversed(reader.GetSize()[:3])), list(reader.GetSpacing()[:3])
                info["cases"].append({
                    "case_id": case.case_id,
                    "split": split,
                    "size_dhw": size,
                    "spacing_xyz": [round(s, 4) for s in spacing],
                    "labelled": case.label_path is not None,
                })
        return info
