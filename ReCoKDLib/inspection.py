"""Inspection maps: what a KD loss looks at, computed by the very code that computes the loss.

Every feature-level KD loss returns, with ``return_maps=True``, its maps in ``KDOutput.maps`` keyed
``"<level>/<name>"`` or ``"<level>/<name>/<class>"``, each ``(B, d, h, w)`` at the level's
resolution. For ReCo-KD (:mod:`ReCoKDLib.losses.recokd`):

==============================  ===========================================================
``fg_mask`` / ``bg_mask``       class-balanced region weights ``W_fg``, ``W_bg`` (1/N_c)
``class_mask/<c>``              the weight of class ``c`` alone (0 = background)
``teacher_spatial_attention``   ``A^S_T`` (mean 1); ``student_spatial_attention``: ``A^S_S``
``teacher_affinity``            context-block softmax over voxels (sums to 1); ``student_affinity``
``discrepancy``                 ``mean_c (F~S - FT)^2`` per voxel
==============================  ===========================================================

:func:`compute_maps` runs a :class:`~ReCoKDLib.taps.DistillationPair` and a KD loss once, without
gradients, and :func:`resample_to_image` brings any map onto the input image grid, so the Slicer
overlays and the reports show exactly what the optimiser sees.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn



class InspectionError(ValueError):
    """An inspection map or target grid has an unexpected shape or option."""


RESAMPLE_MODES = ("trilinear", "nearest")


def resample_to_image(volume_map: Tensor, image_shape: Sequence[int], mode: str = "trilinear") -> Tensor:
    """Resize a map ``(d, h, w)``, ``(B, d, h, w)`` or ``(B, 1, d, h, w)`` to ``image_shape`` ``(D, H, W)``.

    Feature levels of a U-Net cover the whole patch at a coarser grid, so the map is stretched
    over the image (``align_corners=False``, the convention of strided convolutions). Use
    ``mode="nearest"`` for masks and labels, ``"trilinear"`` for continuous maps.

    Returns:
        the map with the same leading dimensions and spatial size ``image_shape``, float32.
    """
    if mode not in RESAMPLE_MODES:
        raise InspectionError(f"unknown resampling mode {mode!r}; choose one of {RESAMPLE_MODES}")
    size = tuple(int(s) for s in image_shape)
    if len(size) != 3 or min(size) < 1:
        raise InspectionError(f"image_shape must be three positive sizes (D, H, W), got {tuple(image_shape)}")
    dims = volume_map.dim()
    if dims == 3:
        x = volume_map[None, None]
    elif dims == 4:
        x = volume_map[:, None]
    elif dims == 5 and volume_map.shape[1] == 1:
        x = volume_map
    else:
        raise InspectionError(f"a map must be (d, h, w), (B, d, h, w) or (B, 1, d, h, w), got {tuple(volume_map.shape)}")
    x = x.detach().float()
    if tuple(x.shape[2:]) != size:
        if mode == "nearest":
            x = F.interpolate(x, size=size, mode="nearest-exact")
        else:
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    if dims == 3:
        return x[0, 0]
    if dims == 4:
        return x[:, 0]
    return x


def is_mask_map(key: str) -> bool:
    """True for maps holding mask weights (resample those with ``mode="nearest"``)."""
    name = key.split("/")
    return any(part in ("fg_mask", "bg_mask", "class_mask") for part in name)


@torch.no_grad()
def compute_maps(
    pair: nn.Module,
    kd_loss: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    regions: bool = False,
    image_grid: bool = False,
) -> dict[str, Tensor]:
    """The inspection maps of ``kd_loss`` for ``images``: one pass in eval mode, without gradients.

    Args:
        pair: a :class:`~ReCoKDLib.taps.DistillationPair` (teacher, student, adapters).
        kd_loss: any KD loss following the ``KDBatch``/``KDOutput`` contract (or a weighted sum).
        images: ``(B, C_in, D, H, W)``.
        labels: ``(B, 1, D, H, W)`` class ids (or region maps with ``regions``); ``None`` to use
            the teacher's argmax as pseudo-labels for the methods that need labels.
        num_classes: ``K`` including the background (default: the teacher's output channels).
        image_grid: resample every map to the image grid (nearest for masks, trilinear otherwise).

    Returns:
        ``{"<level>/<name>[/<class>]": (B, d, h, w) float32}`` plus ``"loss"`` and every term
        as 0-d tensors under ``"terms/<name>"``. Training modes are restored afterwards.
    """
    if images.dim() != 5:
        raise InspectionError(f"images must be (B, C, D, H, W), got {tuple(images.shape)}")
    modes = [(m, m.training) for m in (pair, kd_loss)]
    pair.eval()
    kd_loss.eval()
    try:
        _, batch = pair(images, labels=labels, num_classes=num_classes, regions=regions)
        if batch.labels is None and batch.teacher_logits is not None:
            from ReCoKDLib.losses.masks import pseudo_labels_from_teacher

            batch.labels = pseudo_labels_from_teacher(batch.teacher_logits, regions=regions)
        out = kd_loss(batch, return_maps=True)
    finally:
        for module, mode in modes:
            module.train(mode)
    maps = {key: value.detach().float() for key, value in out.maps.items()}
    if image_grid:
        shape = images.shape[2:]
        maps = {k: resample_to_image(v, shape, "nearest" if is_mask_map(k) else "trilinear") for k, v in maps.items()}
    maps["loss"] = out.loss.detach()
    maps.update({f"terms/{k}": v.detach() for k, v in out.terms.items()})
    return maps


# ---------------------------------------------------------------------------------------------
# Whole volumes: what the Slicer Inspect section, reports and scripts call


def load_trained_kd_state(student_path) -> dict | None:
    """The adapters and KD-loss modules a distillation trained, or ``None``.

    They are stored (at the last saved step) in ``checkpoint.pt`` beside the student's model
    file, which ``recokd distill`` writes; a student file without its run folder has none, and
    the inspection then uses freshly initialised modules (teacher maps and masks do not depend on
    them; student affinity and the discrepancy do).

    Raises:
        CheckpointError: ``checkpoint.pt`` exists but is corrupt or unsafe to unpickle.
    """
    from pathlib import Path

    from ReCoKDLib.checkpoint import safe_torch_load

    path = Path(student_path).parent / "checkpoint.pt"
    if not path.is_file():
        return None
    payload = safe_torch_load(path)  # an unsafe or corrupt file raises CheckpointError
    if not isinstance(payload, dict) or payload.get("job") != "distill" or "aux" not in payload:
        return None
    return payload["aux"]


def _load_kd_state(pair: nn.Module, loss: nn.Module, name: str, kd_state: dict, student_card) -> None:
    """Load the trained adapters and KD-loss modules, or say clearly that they belong to another teacher.

    Raises:
        InspectionError: their shapes do not fit this teacher/student pair (a teacher other than the
            one the student was distilled from).
    """
    try:
        pair.adapters.load_state_dict(kd_state["adapters"])
        prefix = f"losses.{name}."
        own = {k[len(prefix):]: v for k, v in kd_state.get("kd_loss", {}).items() if k.startswith(prefix)}
        if own or not list(loss.state_dict()):
            loss.load_state_dict(own)
    except (RuntimeError, KeyError) as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).strip())
        sha = str((student_card.provenance or {}).get("teacher_sha256") or "")
        raise InspectionError(
            f"the student's trained KD modules (checkpoint.pt beside it) do not fit this teacher (its tapped features "
            f"have {list(pair.teacher_channels)} channels; {detail[:200]}): inspect the student with the teacher it "
            f"was distilled from" + (f" (SHA-256 {sha[:16]}...)" if sha else "")) from None


def _single_method(card_kd: dict, method: str | None) -> str:
    methods = list((card_kd or {}).get("methods") or {})
    if method is not None:
        return method
    return methods[0] if methods else "recokd"


def inspect_volume(
    teacher,
    student,
    image,
    geometry,
    labels=None,
    *,
    method: str | None = None,
    kd_state: dict | None = None,
) -> dict:
    """Every inspection map of ``teacher``/``student`` for one volume, on the volume's own grid.

    The volume is preprocessed exactly as for segmentation (reorientation, crop, the teacher's
    spacing and normalisation; :func:`~ReCoKDLib.data.preprocess.preprocess_case`), padded to the
    networks' size divisor, run through a :class:`~ReCoKDLib.taps.DistillationPair` and the KD
    loss, and each map is brought back with
    :func:`~ReCoKDLib.data.preprocess.restore_to_original` (nearest for masks, linear otherwise).

    Args:
        teacher, student: :class:`~ReCoKDLib.teachers.LoadedModel` (the student's card names its
            taps and KD configuration).
        image: ``(D, H, W)`` or ``(C, D, H, W)`` array; geometry: its :class:`~ReCoKDLib.data.io.Geometry`.
        labels: ``(D, H, W)`` class ids on the same grid, or ``None`` (then the region masks come
            from the teacher's prediction).
        method: the KD method whose maps to show (default: the student's first KD method).
        kd_state: trained adapters and KD-loss modules (:func:`load_trained_kd_state`); ``None``
            uses fresh ones.

    Returns:
        ``{"<level>/<name>[/<class>]": (D, H, W) float32 array}`` on the input grid.
    """
    import numpy as np

    from ReCoKDLib.data.preprocess import preprocess_case, restore_to_original
    from ReCoKDLib.losses.registry import build_kd_loss
    from ReCoKDLib.networks import UNetConfig, encoder_tap_names
    from ReCoKDLib.taps import DistillationPair

    divisor, taps = [1, 1, 1], []
    for model, role in ((teacher, "teacher"), (student, "student")):
        arch = model.card.architecture
        config = UNetConfig.from_dict(arch["config"]) if arch.get("kind") == "dynunet" else None
        if config is not None:
            divisor = [max(a, b) for a, b in zip(divisor, config.divisor)]
        recorded = (student.card.kd or {}).get(f"{role}_taps")
        taps.append(list(recorded or model.card.tap_names or (encoder_tap_names(config) if config else [])))
    if not taps[0] or len(taps[0]) != len(taps[1]):
        raise InspectionError("the model cards do not name matching feature levels (tap_names); "
                              "inspect a student distilled from this teacher")

    from ReCoKDLib.nnunet.labels import label_spec_from_card, labels_to_regions, mark_ignored

    spec = label_spec_from_card(teacher.card)  # nnU-Net regions: KD masks from one map per region
    regions = spec is not None and spec.has_regions
    num_classes = spec.num_heads + 1 if regions else teacher.card.num_classes
    if labels is not None and spec is not None and spec.ignore_label is not None:
        labels = mark_ignored(labels, spec.ignore_label)  # ignored voxels -1: in no KD mask
    pre = preprocess_case(image, geometry, teacher.card.spacing, teacher.card.normalization, label=labels,
                          num_classes=num_classes if labels is not None and spec is None else None)
    pad = [(0, (-n) % d) for n, d in zip(pre.shape, divisor)]
    images = torch.from_numpy(np.pad(pre.image, [(0, 0)] + pad, mode="edge"))[None]
    label_tensor = None
    if pre.label is not None:
        label_tensor = torch.from_numpy(np.pad(pre.label.astype(np.int64), pad))[None, None]
        if regions:
            label_tensor = labels_to_regions(label_tensor, spec.regions)

    pair = DistillationPair(teacher.network.cpu(), student.network.cpu(), taps[0], taps[1], tuple(images.shape[1:]))
    name = _single_method(student.card.kd, method)
    loss = build_kd_loss(name, teacher_channels=pair.teacher_channels, student_channels=pair.student_channels,
                         num_classes=num_classes)
    if kd_state is not None:
        _load_kd_state(pair, loss, name, kd_state, student.card)
    try:
        maps = compute_maps(pair, loss, images, label_tensor, num_classes=num_classes, regions=regions,
                            image_grid=True)
    finally:
        pair.remove_taps()

    d, h, w = pre.shape
    out = {}
    for key, value in maps.items():
        if key == "loss" or key.startswith("terms/"):
            continue
        on_grid = value[0].float().numpy()[:d, :h, :w]
        if is_mask_map(key):
            out[key] = restore_to_original(on_grid, pre).astype(np.float32)
        else:
            out[key] = restore_to_original(on_grid[None], pre, fill="zero")[0].astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Choosing a map by what a person asks for (the Slicer Inspect section and ``recokd serve``)

#: the map choices offered to people, and the map names (of :func:`compute_maps` keys) behind each
MAP_CHOICE_NAMES = {
    "teacher attention": ("teacher_spatial_attention", "teacher_attention"),
    "student attention": ("student_spatial_attention", "student_attention"),
    "teacher affinity": ("teacher_affinity",),
    "student affinity": ("student_affinity",),
    "difference": ("discrepancy",),
    "region mask": ("class_mask", "fg_mask", "region_mask"),
}
MAP_CHOICES = tuple(MAP_CHOICE_NAMES)


def select_map_key(keys, level: int, choice: str, class_key: str = "") -> str:
    """The key among ``keys`` (``"<level>/<name>[/<class>]"``) for a map choice of
    :data:`MAP_CHOICES` at ``level``; ``class_key`` is the class part of the key (the class id
    for ReCo-KD's class masks). With a class, its map wins, else a map without classes
    (attention, affinity, difference); without one, a class-free map, else the first class's.

    Raises:
        InspectionError: unknown choice, or nothing matches (the message lists the level's keys).
    """
    names = MAP_CHOICE_NAMES.get(choice)
    if names is None:
        raise InspectionError(f"unknown map {choice!r}; choose one of {list(MAP_CHOICES)}")
    at_level = [k for k in keys if k.split("/")[0] == str(level)]
    parts = {k: k.split("/") for k in at_level}
    with_class = [k for n in names for k in at_level if parts[k][1] == n and parts[k][2:] == [str(class_key)]]
    plain = [k for n in names for k in at_level if parts[k][1] == n and len(parts[k]) == 2]
    any_class = [k for n in names for k in at_level if parts[k][1] == n]
    order = (with_class, plain if choice != "region mask" else []) if class_key else (plain, any_class)
    for candidates in order:
        if candidates:
            return candidates[0]
    raise InspectionError(
        f"No {choice} map for level {level}" + (f" and class {class_key!r}" if class_key else "")
        + "; available: " + (", ".join(sorted(at_level)) or "none"))
