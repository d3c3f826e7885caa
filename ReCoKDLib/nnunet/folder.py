"""An nnU-Net v2 model folder: plans, dataset.json, configuration, folds and checkpoints.

Layout (what ``nnUNetv2_train`` writes)::

    DatasetNNN_Name/Trainer__Plans__Configuration/
        plans.json  dataset.json  [dataset_fingerprint.json]
        fold_0/checkpoint_final.pth  fold_0/checkpoint_best.pth  ...  fold_all/...

Plans: ``plans["configurations"][name]`` may name a parent in ``inherits_from``; the resolved
configuration is the parent's (recursively resolved) updated by the child's keys, a *shallow*
update as nnU-Net's ``PlansManager`` does (a child that changes the network gives its whole
``architecture``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ReCoKDLib.nnunet import CHECKPOINT_NAMES, NNUNetError

__all__ = [
    "NNUNetModelFolder",
    "LabelInfo",
    "open_model_folder",
    "resolve_configuration",
    "label_info",
    "split_folder_name",
    "available_folds",
    "read_json",
]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`NNUNetError` naming the file when it is missing or bad."""
    if not path.is_file():
        raise NNUNetError(f"{path} is missing: an nnU-Net v2 model folder holds {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NNUNetError(f"{path} is not valid JSON ({exc}); expected {what}") from None
    if not isinstance(data, dict):
        raise NNUNetError(f"{path} holds a JSON {type(data).__name__}, expected an object ({what})")
    return data


def resolve_configuration(plans: Mapping[str, Any], name: str, source: str | os.PathLike = "plans.json") -> dict[str, Any]:
    """The configuration ``name`` of ``plans`` with ``inherits_from`` applied (shallow update, recursively).

    Raises:
        NNUNetError: unknown configuration (the message lists the known ones) or an inheritance cycle.
    """
    configurations = plans.get("configurations") if isinstance(plans, Mapping) else None
    if not isinstance(configurations, Mapping):
        raise NNUNetError(f"{source} has no 'configurations' object; it is not an nnU-Net v2 plans file")
    chain: list[str] = []
    current = name
    while True:
        if current in chain:
            raise NNUNetError(f"{source}: configuration inheritance cycle {' -> '.join(chain + [current])}")
        if current not in configurations:
            what = f"configuration {current!r}" + (f" (inherited by {chain[-1]!r})" if chain else "")
            raise NNUNetError(f"{source} has no {what}; it defines {sorted(configurations)}")
        chain.append(current)
        parent = configurations[current].get("inherits_from")
        if parent is None:
            break
        current = parent
    resolved: dict[str, Any] = {}
    for key in reversed(chain):
        resolved.update(configurations[key])
    resolved.pop("inherits_from", None)
    return resolved


@dataclass
class LabelInfo:
    """nnU-Net's label semantics (``LabelManager``) from a ``dataset.json``.

    Attributes:
        class_names: output names by label value, ``class_names[0]`` the background. Region-based:
            ``"background"`` then one name per region, ordered as the network's heads.
        labels: label value by name (as in dataset.json, ``ignore`` left out).
        has_regions: heads are (overlapping) regions with a sigmoid, not classes with a softmax.
        regions: the foreground regions, one tuple of label values per head (region-based only).
        regions_class_order: the label value written for each region, later ones overwrite earlier.
        ignore_label: the ``ignore`` value (excluded from losses), or ``None``.
        num_heads: network output channels.
    """

    class_names: list[str]
    labels: dict[str, Any]
    has_regions: bool = False
    regions: list[tuple[int, ...]] = field(default_factory=list)
    regions_class_order: list[int] | None = None
    ignore_label: int | None = None
    num_heads: int = 0


def _values(value: Any) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int):
            raise NNUNetError(f"dataset.json label values are integers or lists of integers; got {value!r}")
        out.append(int(v))
    return out


def label_info(dataset_json: Mapping[str, Any], source: str | os.PathLike = "dataset.json") -> LabelInfo:
    """Label semantics of ``dataset_json`` (see :class:`LabelInfo`).

    Raises:
        NNUNetError: no ``labels``, no background 0, non-consecutive class values, a non-integer
            ignore label, or regions without ``regions_class_order``.
    """
    labels = dataset_json.get("labels") if isinstance(dataset_json, Mapping) else None
    if not isinstance(labels, Mapping) or not labels:
        raise NNUNetError(f"{source} has no 'labels' object (e.g. {{\"background\": 0, \"liver\": 1}})")
    ignore = labels.get("ignore")
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise NNUNetError(f"{source}: the 'ignore' label must be one integer; got {ignore!r}")
    named = {k: v for k, v in labels.items() if k != "ignore"}
    if _values(named.get("background", -1)) != [0]:
        raise NNUNetError(f"{source}: nnU-Net needs 'background': 0 in 'labels'; got {dict(labels)}")
    has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in named.values())
    if has_regions:
        regions = [tuple(_values(v)) for k, v in named.items() if k != "background"]
        order = dataset_json.get("regions_class_order")
        if not isinstance(order, (list, tuple)) or len(order) != len(regions):
            raise NNUNetError(
                f"{source} is region-based ({len(regions)} regions) and needs 'regions_class_order' with one label "
                f"value per region; got {order!r}")
        names = ["background"] + [k for k in named if k != "background"]
        return LabelInfo(names, dict(named), True, regions, [int(v) for v in order],
                         int(ignore) if ignore is not None else None, len(regions))
    by_value: dict[int, str] = {}
    for name, value in named.items():
        for v in _values(value):
            if v in by_value and by_value[v] != name:
                raise NNUNetError(f"{source}: label value {v} is given to both {by_value[v]!r} and {name!r}")
            by_value[v] = name
    values = sorted(by_value)
    if values != list(range(len(values))):
        raise NNUNetError(f"{source}: class values must be consecutive from 0 (nnU-Net's rule); got {values}")
    return LabelInfo([by_value[v] for v in values], dict(named), False, [], None,
                     int(ignore) if ignore is not None else None, len(values))


def split_folder_name(path: str | os.PathLike) -> tuple[str, str, str]:
    """``(trainer, plans, configuration)`` from a folder named ``Trainer__Plans__Configuration``."""
    parts = Path(path).name.split("__")
    if len(parts) != 3 or not all(parts):
        raise NNUNetError(f"{path}: an nnU-Net model folder is named Trainer__Plans__Configuration "
                          f"(e.g. nnUNetTrainer__nnUNetPlans__3d_fullres); got {Path(path).name!r}")
    return parts[0], parts[1], parts[2]


def _fold_key(fold: int | str) -> tuple[int, int | str]:
    return (1, str(fold)) if fold == "all" else (0, int(fold))


def available_folds(path: str | os.PathLike, checkpoint_name: str | None = None) -> list[int | str]:
    """Folds with a checkpoint (``checkpoint_name``, or any of final/best), numbers first, then ``"all"``."""
    names = (checkpoint_name,) if checkpoint_name else CHECKPOINT_NAMES
    folds: list[int | str] = []
    for d in Path(path).glob("fold_*"):
        tag = d.name[len("fold_"):]
        if d.is_dir() and (tag == "all" or tag.isdigit()) and any((d / n).is_file() for n in names):
            folds.append("all" if tag == "all" else int(tag))
    return sorted(folds, key=_fold_key)


def _normalise_folds(folds: int | str | Sequence[int | str] | None) -> list[int | str] | None:
    if folds is None:
        return None
    if isinstance(folds, (int, str)):
        folds = [folds]
    out: list[int | str] = []
    for f in folds:
        if isinstance(f, str) and f != "all":
            if not f.isdigit():
                raise NNUNetError(f"a fold is a number or 'all'; got {f!r}")
            f = int(f)
        out.append(f)
    if not out:
        raise NNUNetError("no fold given; name one or more folds (0, 1, ... or 'all') or leave folds unset")
    return out


@dataclass
class NNUNetModelFolder:
    """A model folder, opened (JSON read, checkpoints located, nothing loaded yet).

    Attributes:
        path: the ``Trainer__Plans__Configuration`` folder.
        plans, dataset_json: the parsed JSON files.
        configuration_name: e.g. ``"3d_fullres"``.
        configuration: the resolved configuration (``inherits_from`` applied).
        trainer_name, plans_name: from the folder name.
        folds: the folds used, e.g. ``[0]``, ``[0, 1, 2, 3, 4]`` or ``["all"]``.
        checkpoint_paths: one checkpoint per fold, same order.
    """

    path: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    configuration_name: str
    configuration: dict[str, Any]
    trainer_name: str
    plans_name: str
    folds: list[int | str]
    checkpoint_paths: list[Path]

    @property
    def labels(self) -> LabelInfo:
        return label_info(self.dataset_json, self.path / "dataset.json")

    @property
    def transpose_forward(self) -> list[int]:
        return [int(a) for a in self.plans.get("transpose_forward", [0, 1, 2])]

    @property
    def transpose_backward(self) -> list[int]:
        return [int(a) for a in self.plans.get("transpose_backward", [0, 1, 2])]


def open_model_folder(path: str | os.PathLike, folds: int | str | Sequence[int | str] | None = None,
                      checkpoint_name: str = "checkpoint_final.pth") -> NNUNetModelFolder:
    """Open an nnU-Net v2 model folder.

    Args:
        path: ``.../DatasetNNN_Name/Trainer__Plans__Configuration``.
        folds: a fold (``0``, ``"all"``), several (their logits are averaged), or ``None`` for every
            numbered fold holding ``checkpoint_name`` (``fold_all`` when there is none), as
            ``nnUNetPredictor`` does.
        checkpoint_name: ``"checkpoint_final.pth"`` or ``"checkpoint_best.pth"``.

    Raises:
        NNUNetError: not a folder, ``plans.json``/``dataset.json`` missing or malformed, unknown
            configuration, a fold without the checkpoint (the message lists the folds there are).
    """
    path = Path(path)
    if not path.is_dir():
        raise NNUNetError(f"nnU-Net model folder {path} does not exist or is not a directory")
    if checkpoint_name not in CHECKPOINT_NAMES:
        raise NNUNetError(f"checkpoint name must be one of {list(CHECKPOINT_NAMES)}; got {checkpoint_name!r}")
    plans = read_json(path / "plans.json", "the plans (plans.json, copied there by nnUNetv2_train)")
    dataset_json = read_json(path / "dataset.json", "the dataset description (dataset.json)")
    trainer_name, plans_name, configuration_name = split_folder_name(path)
    configuration = resolve_configuration(plans, configuration_name, path / "plans.json")
    label_info(dataset_json, path / "dataset.json")  # fail early on bad labels

    wanted = _normalise_folds(folds)
    if wanted is None:
        found = available_folds(path, checkpoint_name)
        numbered = [f for f in found if f != "all"]
        wanted = numbered or found
        if not wanted:
            raise NNUNetError(f"{path} holds no fold_*/{checkpoint_name}; folds with checkpoints: "
                              f"{available_folds(path) or 'none'}")
    paths = []
    for fold in wanted:
        ckpt = path / f"fold_{fold}" / checkpoint_name
        if not ckpt.is_file():
            raise NNUNetError(f"{ckpt} does not exist: fold {fold!r} has no {checkpoint_name}; folds with it: "
                              f"{available_folds(path, checkpoint_name) or 'none'}")
        paths.append(ckpt)
    return NNUNetModelFolder(path, plans, dataset_json, configuration_name, configuration, trainer_name, plans_name,
                             list(wanted), paths)
