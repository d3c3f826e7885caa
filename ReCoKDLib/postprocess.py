"""Post-processing of label maps, as a model card records it (``ModelCard.postprocessing``).

One step exists, the one brain extraction and nnU-Net use: **keep the largest connected
component** of a class. ``{"keep_largest_component": ["brain"]}`` turns every voxel of ``brain``
outside its largest 26-connected component into background. HD-BET's own pipeline does this to
its brain mask (``HD_BET.utils.postprocess_prediction``, on by default in its command line); nnU-Net
decides it per class on its validation folds (``postprocessing.pkl``). A student inherits its
teacher's post-processing (same classes), so both are compared as their users run them.

Functional core: :func:`keep_largest_component` on arrays; :func:`steps_for_card` reads and checks a
card's record; :func:`postprocess_labels` applies it. Shapes: label maps ``(D, H, W)``, integer.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["PostProcessingError", "STEPS", "keep_largest_component", "steps_for_card", "postprocess_labels"]

#: the steps a card may name
STEPS = ("keep_largest_component",)


class PostProcessingError(ValueError):
    """A card's ``postprocessing`` names an unknown step or a class the model does not have."""


def keep_largest_component(labels: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """``labels`` with each of ``class_ids`` reduced to its largest 26-connected component (the
    rest becomes 0, background). A class that is absent stays absent; ties keep the component
    met first in C order. Returns a new array of the same dtype and shape ``(D, H, W)``.

    Components are labelled inside the class's bounding box, as ``uint16`` where they fit (the
    label map of a 1 mm head was 95 MB of temporaries as ``int32`` over the whole volume).

    Example:
        >>> a = np.zeros((1, 1, 7), np.uint8); a[0, 0, [0, 1, 2, 5]] = 1
        >>> keep_largest_component(a, [1])[0, 0].tolist()
        [1, 1, 1, 0, 0, 0, 0]
    """
    from scipy import ndimage

    from ReCoKDLib.data.boxes import nonzero_bbox

    out = np.array(labels, copy=True)
    structure = np.ones((3,) * out.ndim, bool)
    for class_id in class_ids:
        mask = out == class_id
        if not mask.any():
            continue
        box = tuple(slice(a, b) for a, b in nonzero_bbox(mask))
        mask = mask[box]  # raster order inside the box is the volume's: ties are broken alike
        try:
            components, count = ndimage.label(mask, structure=structure, output=np.uint16)
        except RuntimeError:  # more than 65,535 components
            components, count = ndimage.label(mask, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        sizes[0] = 0
        drop = components != sizes.argmax()
        drop &= mask
        out[box][drop] = 0
    return out


def steps_for_card(postprocessing: Mapping[str, Any] | None, classes: Sequence[str]) -> dict[str, list[int]]:
    """``{step: [class id, ...]}`` from a card's ``postprocessing`` record (class names or ids).

    Raises:
        PostProcessingError: an unknown step, a class the model does not name, or the background.
    """
    steps: dict[str, list[int]] = {}
    for step, targets in dict(postprocessing or {}).items():
        if step not in STEPS:
            raise PostProcessingError(f"unknown post-processing step {step!r}; known: {list(STEPS)}")
        ids = []
        for target in targets:
            class_id = classes.index(target) if isinstance(target, str) and target in classes else target
            if not isinstance(class_id, int) or isinstance(class_id, bool) or not 0 < class_id < len(classes):
                raise PostProcessingError(f"post-processing {step}: {target!r} is not a foreground class of this "
                                          f"model ({list(classes)[1:]})")
            ids.append(class_id)
        steps[step] = ids
    return steps


def postprocess_labels(labels: np.ndarray, postprocessing: Mapping[str, Any] | None,
                       classes: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply a card's post-processing to ``labels`` ``(D, H, W)``.

    Returns ``(labels, info)``; ``info`` is ``{}`` when there is nothing to do, else
    ``{"keep_largest_component": {class name: voxels removed}}``.
    """
    steps = steps_for_card(postprocessing, classes)
    ids = steps.get("keep_largest_component", [])
    if not ids:
        return labels, {}
    kept = keep_largest_component(labels, ids)
    removed = {classes[i]: int(np.count_nonzero((labels == i) & (kept != i))) for i in ids}
    return kept, {"keep_largest_component": removed}
