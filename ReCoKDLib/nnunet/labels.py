"""nnU-Net v2 label semantics without nnunetv2: region-based labels and the ignore label.

A ``dataset.json`` ``labels`` entry maps a name to an integer label value, or to a list of values
(a *region*, e.g. BraTS' ``"whole tumor": [1, 2, 3]``). nnU-Net's rules, reproduced here:

* **Plain labels** (every entry one integer): one softmax head per label, background included;
  values ``0..K-1``.
* **Region-based** (some entry a list of more than one value): one sigmoid head per foreground
  entry, in declaration order; ``regions_class_order`` (one label value per region) says how the
  regions are painted back into one label map: in that order, each region where its probability
  exceeds 0.5 (later regions overwrite earlier ones).
* **Ignore label** (key ``"ignore"``): an integer above every other value; no head, and its voxels
  count in no loss. ReCoKD marks them ``-1`` as soon as a label map is read
  (:func:`mark_ignored`): class-id labels ``(B, 1, D, H, W)`` then carry ``-1`` where ignored, region
  maps ``(B, R, D, H, W)`` carry ``-1`` in every channel, and every consumer (the segmentation
  loss :class:`SegmentationLoss`, the KD region masks of ``losses.masks``) skips negative voxels.
  nnU-Net marks the voxels outside the non-zero crop ``-1`` too; they are skipped the same way.

Errors are :class:`LabelSpecError` (a ``ValueError``) naming the entry and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IGNORED",
    "LabelSpecError",
    "LabelSpec",
    "parse_labels",
    "label_spec_from_dataset_json",
    "mark_ignored",
    "labels_to_regions",
    "regions_to_segmentation",
    "valid_voxels",
    "label_spec_from_card",
    "card_label_spec",
    "output_channels",
    "paint_regions",
    "region_dice",
    "SegmentationLoss",
    "DeepSupervisionSegLoss",
]

#: the value every ignored voxel carries once read (nnU-Net's "outside the crop" value too)
IGNORED = -1


class LabelSpecError(ValueError):
    """A ``labels`` / ``regions_class_order`` entry of a dataset.json breaks nnU-Net's label rules."""


@dataclass(frozen=True)
class LabelSpec:
    """The labels of an nnU-Net dataset.

    Attributes:
        names: the ``labels`` entries except ``"ignore"``, in declaration order (background first).
        values: per name, the label values it covers (one for a plain label, several for a region).
        has_regions: region-based (sigmoid heads) rather than one softmax over all labels.
        regions_class_order: region-based only: the label value each region is painted with.
        ignore_label: the ignore label's value, or ``None``.
    """

    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    has_regions: bool = False
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None

    @property
    def max_value(self) -> int:
        """The largest label value of a class or region (the ignore label excluded)."""
        return max(v for vals in self.values for v in vals)

    @property
    def value_names(self) -> list[str]:
        """A name per label value ``0..max_value`` (what a label file holds, ignore excluded):
        the entry that is exactly that value, else ``label_<value>``."""
        exact = {vals[0]: n for n, vals in zip(self.names, self.values) if len(vals) == 1}
        return [exact.get(v, f"label_{v}") for v in range(self.max_value + 1)]

    @property
    def regions(self) -> list[tuple[int, ...]]:
        """Foreground regions (region-based) or foreground labels as 1-tuples (plain), in head order."""
        return [vals for n, vals in zip(self.names, self.values) if vals != (0,)]

    @property
    def head_names(self) -> list[str]:
        """Names of the network's output channels: all labels (plain, background first) or the
        foreground regions (region-based)."""
        if self.has_regions:
            return [n for n, vals in zip(self.names, self.values) if vals != (0,)]
        return [n for _, n in sorted((vals[0], n) for n, vals in zip(self.names, self.values))]

    @property
    def num_heads(self) -> int:
        return len(self.head_names)

    def to_dict(self) -> dict[str, Any]:
        """The ``labels`` (+ ``regions_class_order``) entries of a dataset.json for this spec."""
        labels: dict[str, Any] = {n: (list(v) if len(v) > 1 else v[0]) for n, v in zip(self.names, self.values)}
        if self.ignore_label is not None:
            labels["ignore"] = self.ignore_label
        out: dict[str, Any] = {"labels": labels}
        if self.regions_class_order is not None:
            out["regions_class_order"] = list(self.regions_class_order)
        return out


def _int_value(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LabelSpecError(f"{where} must be an integer label value; got {value!r}")
    if value < 0:
        raise LabelSpecError(f"{where} must be >= 0; got {value}")
    return int(value)


def parse_labels(labels: Mapping[str, Any], regions_class_order: Sequence[int] | None = None,
                 where: str = "dataset.json") -> LabelSpec:
    """Read and check a dataset.json ``labels`` mapping (and ``regions_class_order``).

    Args:
        labels: ``{"background": 0, name: int | [ints], ..., "ignore"?: int}``.
        regions_class_order: one label value per foreground region; required for region labels.
        where: the file named in error messages.

    Raises:
        LabelSpecError: no background 0, values not consecutive, an ignore label that is not the
            highest value, region labels without a fitting ``regions_class_order``.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise LabelSpecError(f"{where}: 'labels' must be a non-empty object {{name: value}}; got {labels!r}")
    names, values, ignore = [], [], None
    for name, value in labels.items():
        entry = f"{where}: label {name!r}"
        if name == "ignore":
            ignore = _int_value(value, entry)
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                raise LabelSpecError(f"{entry} is an empty region; list at least one label value")
            vals = tuple(_int_value(v, f"{entry} (region member)") for v in value)
        else:
            vals = (_int_value(value, entry),)
        names.append(str(name))
        values.append(vals)
    has_regions = any(len(v) > 1 for v in values)
    if (0,) not in values:
        raise LabelSpecError(f"{where}: needs a background label with value 0 (e.g. \"background\": 0); got {dict(labels)}")
    if has_regions and any(0 in v and v != (0,) for v in values):
        raise LabelSpecError(f"{where}: a region may not contain the background value 0")
    used = sorted({v for vals in values for v in vals})
    if used != list(range(len(used))):
        raise LabelSpecError(f"{where}: label values must be consecutive 0..N with 0 = background; got {used}")
    if len(used) < 2:
        raise LabelSpecError(f"{where}: needs background (0) and at least one class; got {dict(labels)}")
    if not has_regions and len(set(values)) != len(values):
        raise LabelSpecError(f"{where}: two labels share one value: {dict(labels)}")
    if ignore is not None and ignore <= used[-1]:
        raise LabelSpecError(
            f"{where}: the ignore label ({ignore}) must be higher than every class value (max {used[-1]}); "
            f"nnU-Net uses max + 1 = {used[-1] + 1}")
    order = None
    if has_regions:
        n_regions = sum(1 for v in values if v != (0,))
        if regions_class_order is None:
            raise LabelSpecError(
                f"{where}: region-based labels need 'regions_class_order' (one label value per region, {n_regions} "
                "entries) to paint the regions back into a label map")
        order = tuple(_int_value(v, f"{where}: regions_class_order entry") for v in regions_class_order)
        if len(order) != n_regions:
            raise LabelSpecError(
                f"{where}: regions_class_order has {len(order)} entries but there are {n_regions} foreground regions")
    elif regions_class_order is not None:
        order = tuple(_int_value(v, f"{where}: regions_class_order entry") for v in regions_class_order)
    return LabelSpec(tuple(names), tuple(values), has_regions, order, ignore)


def label_spec_from_dataset_json(dataset_json: Mapping[str, Any], where: str = "dataset.json") -> LabelSpec:
    """:func:`parse_labels` of a whole dataset.json dict."""
    if "labels" not in dataset_json:
        raise LabelSpecError(f"{where} lacks the required key 'labels'")
    return parse_labels(dataset_json["labels"], dataset_json.get("regions_class_order"), where)


# ---------------------------------------------------------------------------------------------
# Label maps


def mark_ignored(label: np.ndarray | Tensor, ignore_label: int | None) -> np.ndarray | Tensor:
    """Set the ignore label's voxels to :data:`IGNORED` (-1); a copy, integer dtype (int16 for numpy).

    Works on any shape, numpy or torch; ``ignore_label=None`` only converts the dtype.
    """
    if isinstance(label, Tensor):
        out = label.round().long() if label.is_floating_point() else label.clone()
        if ignore_label is not None:
            out[out == ignore_label] = IGNORED
        return out
    array = np.asarray(label)
    if not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array)
    out = array.astype(np.int16, copy=True)
    if ignore_label is not None:
        out[array == ignore_label] = IGNORED
    return out


def labels_to_regions(labels: Tensor, regions: Sequence[Sequence[int]]) -> Tensor:
    """Class-id labels ``(B, 1, D, H, W)`` -> region maps ``(B, R, D, H, W)`` float32.

    ``out[:, r] = 1`` where the label value is in ``regions[r]``; ignored voxels (< 0) are
    :data:`IGNORED` in every channel.
    """
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise LabelSpecError(f"class-id labels must be (B, 1, D, H, W); got shape {tuple(labels.shape)}")
    ids = labels.round().long() if labels.is_floating_point() else labels.long()
    maps = [torch.isin(ids, torch.as_tensor(list(r), device=ids.device)) for r in regions]
    out = torch.cat(maps, dim=1).to(torch.float32)
    return torch.where(ids < 0, torch.full_like(out, float(IGNORED)), out)


def regions_to_segmentation(probabilities: Tensor | np.ndarray, regions_class_order: Sequence[int],
                            threshold: float = 0.5) -> np.ndarray:
    """Paint region probabilities ``(R, D, H, W)`` into one label map ``(D, H, W)`` (uint8, or
    uint16 above 255), nnU-Net's way: region ``r`` where ``p_r > threshold``, in order, later
    regions overwriting earlier ones."""
    probs = probabilities.detach().cpu().numpy() if isinstance(probabilities, Tensor) else np.asarray(probabilities)
    if probs.ndim != 4 or probs.shape[0] != len(regions_class_order):
        raise LabelSpecError(
            f"expected probabilities (R, D, H, W) with R = {len(regions_class_order)} regions; got {probs.shape}")
    dtype = np.uint8 if max(regions_class_order) <= 255 else np.uint16
    seg = np.zeros(probs.shape[1:], dtype=dtype)
    for prob, value in zip(probs, regions_class_order):
        seg[prob > threshold] = value
    return seg


def valid_voxels(labels: Tensor) -> Tensor:
    """``(B, 1, D, H, W)`` bool: voxels that are not ignored (>= 0 in every channel)."""
    return (labels >= 0).all(dim=1, keepdim=True)


def label_spec_from_card(card: Any) -> LabelSpec | None:
    """The :class:`LabelSpec` a model card records, or ``None`` for plain softmax classes.

    Read from ``card.label_spec`` (ReCoKD models trained or distilled on an nnU-Net dataset), else
    from the ``dataset.json`` an nnU-Net model folder's card carries in
    ``provenance["nnunet"]["dataset_json"]`` (teachers loaded from a folder, students distilled
    from them).
    """
    recorded = getattr(card, "label_spec", None)
    if recorded:
        recorded = dict(recorded)
        order = recorded.pop("label_order", None)
        labels = recorded.get("labels")
        if order is not None and isinstance(labels, Mapping):  # cards are written with sorted keys
            if sorted(order) != sorted(labels):
                raise LabelSpecError(f"model card 'label_spec': label_order {order} does not list the labels {sorted(labels)}")
            recorded["labels"] = {name: labels[name] for name in order}
        return label_spec_from_dataset_json(recorded, "model card 'label_spec'")
    provenance = getattr(card, "provenance", None) or {}
    nnunet = provenance.get("nnunet") if isinstance(provenance, Mapping) else None
    dataset_json = nnunet.get("dataset_json") if isinstance(nnunet, Mapping) else None
    if isinstance(dataset_json, Mapping) and "labels" in dataset_json:
        spec = label_spec_from_dataset_json(dataset_json, "the teacher's nnU-Net dataset.json")
        return spec if spec.has_regions or spec.ignore_label is not None else None
    return None


def card_label_spec(spec: LabelSpec) -> dict[str, Any]:
    """What a model card records of ``spec`` (``ModelCard.label_spec``): the dataset.json entries
    plus ``label_order``, the declaration order that fixes the head order (card JSON sorts keys)."""
    record = spec.to_dict()
    record["label_order"] = list(record["labels"])
    return record


def output_channels(spec: LabelSpec | None, num_classes: int) -> int:
    """Output channels of a network for ``spec``: one sigmoid head per region (region-based), else
    one softmax channel per class (``num_classes``, background included)."""
    return spec.num_heads if spec is not None and spec.has_regions else int(num_classes)


def paint_regions(logits: Tensor, regions_class_order: Sequence[int]) -> Tensor:
    """Region logits ``(B, R, D, H, W)`` -> class ids ``(B, 1, D, H, W)`` int64, as
    :func:`regions_to_segmentation` (``sigmoid > 0.5``, i.e. ``logit > 0``; later regions overwrite)."""
    if logits.dim() != 5 or logits.shape[1] != len(regions_class_order):
        raise LabelSpecError(f"expected region logits (B, R, D, H, W) with R = {len(regions_class_order)}; "
                             f"got {tuple(logits.shape)}")
    ids = torch.zeros((logits.shape[0], 1, *logits.shape[2:]), dtype=torch.long, device=logits.device)
    for r, value in enumerate(regions_class_order):
        ids[logits[:, r:r + 1] > 0] = int(value)
    return ids


def region_dice(predicted: np.ndarray, label: np.ndarray, regions: Sequence[Sequence[int]]) -> list[float]:
    """Dice per region between predicted region maps ``(R, D, H, W)`` (bool) and a class-id label
    map ``(D, H, W)``; voxels with a negative label (ignored) count nowhere. NaN where a region is
    empty in both."""
    predicted, label = np.asarray(predicted, bool), np.asarray(label)
    if predicted.ndim != 4 or predicted.shape[0] != len(regions) or predicted.shape[1:] != label.shape:
        raise LabelSpecError(f"expected region maps (R={len(regions)}, D, H, W) on the label's grid {label.shape}; "
                             f"got {predicted.shape}")
    valid = label >= 0
    scores = []
    for pred, values in zip(predicted, regions):
        p, t = pred & valid, np.isin(label, list(values)) & valid
        denom = int(p.sum()) + int(t.sum())
        scores.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return scores


# ---------------------------------------------------------------------------------------------
# Segmentation loss with ignored voxels


def _soft_dice(probs: Tensor, target: Tensor, valid: Tensor, smooth: float) -> Tensor:
    """1 - mean over channels of the batch soft Dice, over valid voxels only. ``(B, C, ...)``."""
    dims = [0] + list(range(2, probs.dim()))
    probs, target = probs * valid, target * valid
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy that skips ignored voxels (nnU-Net's ``DC_and_CE_loss`` /
    ``DC_and_BCE_loss`` with an ignore label).

    * plain labels: softmax Dice over the foreground classes (batch Dice, as nnU-Net) + CE;
    * ``regions``: sigmoid Dice over the regions + binary CE, region maps built from the labels.

    ``forward(logits (B, K, D, H, W), labels (B, 1, D, H, W))``: labels are class ids; voxels
    < 0 are ignored. A batch with no valid voxel gives a zero loss (with a gradient path).
    """

    def __init__(self, regions: Sequence[Sequence[int]] | None = None, smooth: float = 1e-5) -> None:
        super().__init__()
        self.regions = [tuple(int(v) for v in r) for r in regions] if regions else None
        self.smooth = float(smooth)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 5 or labels.dim() != 5 or labels.shape[1] != 1:
            raise LabelSpecError(f"expected logits (B, K, D, H, W) and labels (B, 1, D, H, W); got "
                                 f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        if logits.shape[2:] != labels.shape[2:]:
            raise LabelSpecError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in size; "
                                 "resize the labels first (DeepSupervisionSegLoss does)")
        logits = logits.float()
        ids = labels.round().long() if labels.is_floating_point() else labels.long()
        valid = (ids >= 0).to(logits.dtype)
        n_valid = valid.sum()
        if self.regions is not None:
            if logits.shape[1] != len(self.regions):
                raise LabelSpecError(f"{len(self.regions)} regions but the network has {logits.shape[1]} outputs")
            target = labels_to_regions(ids, self.regions).clamp(min=0)
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            ce = (bce * valid).sum() / (n_valid * logits.shape[1]).clamp(min=1.0)
            dice = _soft_dice(torch.sigmoid(logits), target, valid, self.smooth)
        else:
            k = logits.shape[1]
            if ids.numel() and int(ids.max()) >= k:
                raise LabelSpecError(f"label value {int(ids.max())} is outside the network's {k} classes")
            ce = F.cross_entropy(logits, ids[:, 0].clamp(min=0), reduction="none")
            ce = (ce * valid[:, 0]).sum() / n_valid.clamp(min=1.0)
            target = F.one_hot(ids[:, 0].clamp(min=0), k).permute(0, 4, 1, 2, 3).to(logits.dtype)
            probs = torch.softmax(logits, dim=1)
            dice = _soft_dice(probs[:, 1:], target[:, 1:], valid, self.smooth) if k > 1 else logits.sum() * 0
        if n_valid == 0:
            return logits.sum() * 0.0
        return dice + ce


class DeepSupervisionSegLoss(nn.Module):
    """:class:`SegmentationLoss` over deep-supervision heads of any resolution.

    ``forward(outputs, labels)``: ``outputs`` a list ``[(B, K, d_i, h_i, w_i), ...]`` (full
    resolution first, e.g. dynamic-network-architectures' decoder) or one tensor; labels
    ``(B, 1, D, H, W)`` are resized to each head by nearest neighbour (ignored voxels stay -1).
    Head ``i`` is weighted ``2**-i``, normalised to sum 1 (nnU-Net).
    """

    def __init__(self, num_heads: int, regions: Sequence[Sequence[int]] | None = None, smooth: float = 1e-5) -> None:
        super().__init__()
        if num_heads < 1:
            raise LabelSpecError(f"num_heads must be >= 1; got {num_heads}")
        raw = [0.5**i for i in range(num_heads)]
        self.weights = [w / sum(raw) for w in raw]
        self.loss = SegmentationLoss(regions, smooth)

    def forward(self, outputs: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        from ReCoKDLib.losses.masks import resize_labels

        heads = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        if len(heads) > len(self.weights):
            raise LabelSpecError(f"{len(heads)} outputs but the loss was built for {len(self.weights)} heads")
        total = heads[0].new_zeros(())
        for weight, head in zip(self.weights, heads):
            total = total + weight * self.loss(head, resize_labels(labels, head.shape[2:]))
        return total
