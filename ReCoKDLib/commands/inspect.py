"""``recokd inspect``: what distillation looks at, as volumes Slicer opens and pictures Slicer draws.

Example::

    recokd inspect --image ct.nii.gz --teacher runs/demo/teacher/model_last.pt \\
        --student runs/demo/distilled/model_last.pt --out inspect_ct --levels 0 1

For one image and a teacher/student pair (the student's card names its feature levels and KD
method; trained adapters and context blocks come from ``checkpoint.pt`` beside it), writes in
``--out``:

==================================  ===============================================================
``segmentation.<ext>``              the student's label map (what *Segment* gives)
``level<L>/region_<c>_<name>.<ext>`` class-balanced region weights of class ``c`` at level ``L``
                                    (value ``1/N_c`` on the class, 0 elsewhere); ``region_fg``/``_bg``
``level<L>/affinity_teacher.<ext>`` teacher / student affinity maps, and ``affinity_difference``
                                    (teacher - student)
``png/*.png``                       Slicer-rendered views (axial | coronal | sagittal) of the image with
                                    each map as a coloured overlay, and of the segmentation (+ 3D)
``index.html``                      one self-contained page (relative links) laying them out per
                                    level and class, with the weights
``inspection.json``                 the same as data: every file, level, class, weight, voxel count
==================================  ===============================================================

Every volume lies on the image's exact grid (size, spacing, origin, direction). Inputs are all
checked before anything is written, the destination included. Exit codes (:mod:`ReCoKDLib.commands.runner`):
0 done, 1 failure while running, 2 bad input, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ReCoKDLib.commands.runner import run_command
from ReCoKDLib.commands.inference_options import add_inference_arguments, inference_kwargs
from ReCoKDLib.progress import add_progress_argument

STAGE = "inspect"
FORMATS = {"nrrd": ".nrrd", "nii.gz": ".nii.gz", "nii": ".nii", "mha": ".mha"}
AFFINITY_ROLES = ("teacher", "student", "difference")


class InspectCommandError(ValueError):
    """``recokd inspect`` cannot run as asked (missing file, class-count or grid mismatch, bad level)."""


@dataclass
class MapEntry:
    """One written map: where it is, what it is, how it was drawn."""

    key: str
    level: int
    kind: str  # "region" or "affinity"
    name: str  # class name, "foreground"/"background", or the affinity role
    volume: str
    png: str | None = None
    weight: float | None = None
    voxels: int = 0
    range: tuple[float, float] = (0.0, 0.0)
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Library entry point


def inspect_to_folder(
    image_path: str | Path,
    teacher_path: str | Path,
    student_path: str | Path,
    out_dir: str | Path,
    labels_path: str | Path | None = None,
    levels: Sequence[int] | None = None,
    roi=None,
    fmt: str = "nrrd",
    device: str = "auto",
    render: bool = True,
    size: Sequence[int] = (256, 256),
    window_level: tuple[float, float] | None = None,
    reporter=None,
    inference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every inspection map of ``teacher``/``student`` on ``image`` into ``out_dir``.

    Args:
        image_path: the image (NIfTI, NRRD, MHA, DICOM folder); labels_path: optional class ids
            on the same grid (else the region masks follow the teacher's prediction).
        levels: feature levels to write (default all).
        roi: an :class:`~ReCoKDLib.infer.ROI`: inspect this box only (maps are 0 outside it).
        fmt: volume format, one of ``nrrd``, ``nii.gz``, ``nii``, ``mha``.
        device: where the student's segmentation runs (the inspection pass runs on the CPU).
        render: write Slicer-rendered PNGs and the HTML pictures (needs the ``render`` extra).
        size: ``(width, height)`` of each rendered view; window_level: ``(window, level)`` of the
            image in the pictures (default its 1st-99th percentile range).

    Returns:
        the ``inspection.json`` content.

    Raises:
        InspectCommandError (and the readers' ``ValueError`` subclasses): before anything is written.
    """
    from ReCoKDLib.data.io import check_same_grid, crop, read_image
    from ReCoKDLib.infer import segment_volume
    from ReCoKDLib.inspection import inspect_volume, load_trained_kd_state
    from ReCoKDLib.teachers import load_model

    if fmt not in FORMATS:
        raise InspectCommandError(f"unknown volume format {fmt!r}; choose one of {list(FORMATS)}")
    for what, path in (("image", image_path), ("teacher", teacher_path), ("student", student_path),
                       ("labels", labels_path)):
        if path is not None and not Path(path).exists():
            raise InspectCommandError(f"{what} not found: {path}")
    if render:
        from ReCoKDLib.mrml.views import require_render_extra

        require_render_extra()

    # ---- load and check everything before writing
    image, geometry = read_image(image_path, allow_channels=True)
    image3 = image[0] if image.ndim == 4 else image
    teacher, student = load_model(teacher_path), load_model(student_path)
    classes = list(teacher.card.classes)
    if len(student.card.classes) != len(classes):
        raise InspectCommandError(
            f"teacher {teacher_path} has {len(classes)} classes {classes} but student {student_path} has "
            f"{len(student.card.classes)} {list(student.card.classes)}; inspect a student distilled from this teacher")
    if teacher.card.in_channels != (image.shape[0] if image.ndim == 4 else 1):
        raise InspectCommandError(
            f"the teacher takes {teacher.card.in_channels} input channel(s) but {image_path} has "
            f"{image.shape[0] if image.ndim == 4 else 1}")
    labels = None
    if labels_path is not None:
        labels, label_geometry = read_image(labels_path, allow_channels=False)
        check_same_grid(geometry, label_geometry, image3.shape, labels.shape, "image", "labels")
        if labels.min() < 0 or labels.max() >= len(classes) or np.any(np.mod(labels, 1)):
            raise InspectCommandError(
                f"labels {labels_path} hold values {int(labels.min())}..{int(labels.max())}; the models have "
                f"{len(classes)} classes (ids 0..{len(classes) - 1}: {classes})")
        labels = labels.astype(np.int64)
    box = roi.voxel_box(geometry, image3.shape) if roi is not None else tuple((0, n) for n in image3.shape)
    start, stop = [b[0] for b in box], [b[1] for b in box]
    box_slices = tuple(slice(a, b) for a, b in box)
    size_dhw = [b - a for a, b in zip(start, stop)]

    # ---- compute
    if reporter is not None:
        reporter.start(STAGE, total=3, message="inspection maps")
    sub = image[(slice(None),) + box_slices] if image.ndim == 4 else image[box_slices]
    _, sub_geometry = crop(image3, geometry, start, size_dhw)
    sub_labels = labels[box_slices] if labels is not None else None
    maps = inspect_volume(teacher, student, sub, sub_geometry, sub_labels,
                          kd_state=load_trained_kd_state(student_path))
    available = sorted({int(k.split("/")[0]) for k in maps})
    chosen = available if not levels else [int(v) for v in levels]
    missing = [v for v in chosen if v not in available]
    if missing:
        raise InspectCommandError(f"level(s) {missing} do not exist; the student's feature levels are {available}")
    if reporter is not None:
        reporter.progress(STAGE, 1, 3, message="segmentation")
    segmentation = segment_volume(student, image, geometry, roi=roi, device=device, **dict(inference or {})).labels

    # ---- write volumes
    out_dir = Path(out_dir)
    ext = FORMATS[fmt]
    entries = _write_volumes(maps, chosen, classes, image3.shape, box_slices, geometry, out_dir, ext)
    from ReCoKDLib.data.io import write_image

    seg_name = f"segmentation{ext}"
    write_image(segmentation.astype(np.uint8 if len(classes) < 256 else np.uint16), geometry, out_dir / seg_name)
    if reporter is not None:
        reporter.progress(STAGE, 2, 3, message="pictures")

    # ---- pictures and page
    pictures: dict[str, str] = {}
    if render:
        pictures = _render_pictures(image3, geometry, segmentation, classes, entries, out_dir, size, window_level)
    manifest = {
        "image": str(image_path), "teacher": str(teacher_path), "student": str(student_path),
        "labels": None if labels_path is None else str(labels_path),
        "masks_from": "labels" if labels_path is not None else "teacher prediction",
        "roi_voxels_dhw": [list(b) for b in box], "levels": chosen, "classes": classes,
        "segmentation": seg_name, "segmentation_png": pictures,
        "maps": [vars(e) | {"range": list(e.range)} for e in entries],
    }
    from ReCoKDLib.checkpoint import atomic_write_text

    atomic_write_text(out_dir / "inspection.json", json.dumps(manifest, indent=2) + "\n")
    index = atomic_write_text(out_dir / "index.html", _html(manifest, entries))
    if reporter is not None:
        reporter.done(STAGE, path=str(index), message=f"wrote {len(entries)} maps and {index}")
    return manifest


def _full(volume: np.ndarray, shape: Sequence[int], box_slices) -> np.ndarray:
    out = np.zeros(tuple(shape), dtype=np.float32)
    out[box_slices] = volume
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))


def _write_volumes(maps, levels, classes, shape, box_slices, geometry, out_dir: Path, ext: str) -> list[MapEntry]:
    from ReCoKDLib.data.io import write_image

    entries: list[MapEntry] = []

    def put(key: str, level: int, kind: str, name: str, stem: str, volume: np.ndarray, **extra) -> None:
        full = _full(volume, shape, box_slices)
        rel = f"level{level}/{stem}{ext}"
        write_image(full, geometry, out_dir / rel)
        positive = full[full > 0]
        weight = float(positive.max()) if kind == "region" and positive.size else None
        entries.append(MapEntry(key, level, kind, name, rel, weight=weight, voxels=int((full != 0).sum()),
                                range=(float(full.min()), float(full.max())), extra=extra))

    for level in levels:
        for c, name in enumerate(classes):
            key = f"{level}/class_mask/{c}"
            if key in maps and np.any(maps[key] > 0):
                put(key, level, "region", name, f"region_{c:02d}_{_safe(name)}", maps[key], class_id=c)
        for key_name, label in (("fg_mask", "foreground"), ("bg_mask", "background")):
            key = f"{level}/{key_name}"
            if key in maps:
                put(key, level, "region", label, f"region_{'fg' if key_name == 'fg_mask' else 'bg'}", maps[key])
        teacher, student = maps.get(f"{level}/teacher_affinity"), maps.get(f"{level}/student_affinity")
        if teacher is not None and student is not None:
            for role, volume in (("teacher", teacher), ("student", student), ("difference", teacher - student)):
                put(f"{level}/{role}_affinity", level, "affinity", role, f"affinity_{role}", volume)
    return entries


def _render_pictures(image, geometry, segmentation, classes, entries, out_dir: Path, size,
                     window_level=None) -> dict[str, str]:
    """Slicer-rendered PNGs: the segmentation (3 slices + 3D), then each map over the image."""
    from ReCoKDLib.data.io import read_image
    from ReCoKDLib.mrml.views import OffscreenViews, hstack_images, write_png

    png_dir = out_dir / "png"
    pictures: dict[str, str] = {}
    has_segments = bool(np.any(segmentation))
    with OffscreenViews(size=size, threed=has_segments) as views:
        views.show_volume(image, geometry, window_level=window_level)
        views.show_segmentation(segmentation, geometry, classes, name="student segmentation")
        views.focus_on_labels(segmentation, geometry)
        for name, path in views.render_slices(png_dir, prefix="segmentation_").items():
            pictures[name] = path.relative_to(out_dir).as_posix()
        views.set_segmentation_opacity(0.0, 0.8)  # outlines only under the maps
        for entry in entries:
            volume, _ = read_image(out_dir / entry.volume, allow_channels=False)
            low, high = entry.range
            window, threshold, colormap = _display_of(entry, volume)
            views.show_overlay(volume, geometry, entry.key, colormap=colormap, window=window, threshold=threshold,
                               opacity=0.6 if entry.name == "difference" else 0.5)
            focus = (volume > 0) if entry.kind == "region" and entry.extra.get("class_id") else segmentation
            views.focus_on_labels(focus, geometry)
            rel = f"png/{Path(entry.volume).with_suffix('').with_suffix('').as_posix().replace('/', '_')}.png"
            write_png(hstack_images([views.render(o) for o in views.slice_views]), out_dir / rel)
            entry.png = rel
    return pictures


#: affinity maps are positive almost everywhere and nearly flat with a few peaks: colour the
#: range between these quantiles of the positive values, and hide voxels below the first
AFFINITY_QUANTILES = (0.5, 0.995)


def _display_of(entry: MapEntry, volume: np.ndarray) -> tuple[tuple[float, float], float | None, str]:
    """``(window, threshold, colour map)`` of one map: region weights in Viridis from 0 (every
    weighted voxel shown), affinities in Inferno over their upper half, differences diverging
    about 0 (no threshold)."""
    low, high = entry.range
    if entry.name == "difference":
        bound = max(abs(low), abs(high), 1e-12)
        return (-bound, bound), None, "Diverging"
    high = max(high, 1e-12)
    if entry.kind == "region":
        return (0.0, high), high * 1e-3, "Viridis"
    positive = volume[volume > 0]
    if not positive.size:
        return (0.0, high), high, "Inferno"
    low_q, high_q = (float(v) for v in np.quantile(positive, AFFINITY_QUANTILES))
    return (low_q, max(high_q, low_q + 1e-12)), low_q, "Inferno"


def _html(manifest: dict, entries: list[MapEntry]) -> str:
    esc = html.escape

    def img(src: str | None, alt: str) -> str:
        return f'<img src="{esc(src)}" alt="{esc(alt)}" loading="lazy">' if src else "<i>(no picture)</i>"

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ReCoKD inspection</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img{max-width:100%}"
        ".views img{max-width:24%;margin-right:1%}</style></head><body>",
        "<h1>ReCoKD inspection</h1>",
        f"<p>image <code>{esc(manifest['image'])}</code>; teacher <code>{esc(manifest['teacher'])}</code>; "
        f"student <code>{esc(manifest['student'])}</code>; region masks from the {esc(manifest['masks_from'])}. "
        "Every volume lies on the image's exact grid: open it in 3D Slicer (drag and drop).</p>",
        f"<h2>Student segmentation</h2><p><a href='{esc(manifest['segmentation'])}'>"
        f"{esc(manifest['segmentation'])}</a></p><div class='views'>",
    ]
    parts += [img(src, f"segmentation {view}") for view, src in manifest["segmentation_png"].items()]
    parts.append("</div><p>Pictures rendered by 3D Slicer's slice and 3D views (offscreen): axial | coronal | "
                 "sagittal; segments outlined under each map.</p>")
    for level in manifest["levels"]:
        parts.append(f"<h2>Level {level}</h2><h3>Affinity maps (teacher, student, teacher &minus; student)</h3><table><tr>")
        affinity = [e for e in entries if e.level == level and e.kind == "affinity"]
        parts += [f"<th>{esc(e.name)}</th>" for e in affinity]
        parts.append("</tr><tr>")
        parts += [f"<td>{img(e.png, e.key)}<br><a href='{esc(e.volume)}'>{esc(e.volume)}</a><br>"
                  f"range {e.range[0]:.3g} .. {e.range[1]:.3g}</td>" for e in affinity]
        parts.append("</tr></table><h3>Region masks (class-balanced weights)</h3>"
                     "<table><tr><th>class</th><th>weight per voxel</th><th>voxels</th><th>picture</th><th>volume</th></tr>")
        for e in (e for e in entries if e.level == level and e.kind == "region"):
            weight = "–" if e.weight is None else f"{e.weight:.4g}"
            parts.append(f"<tr><td>{esc(e.name)}</td><td>{weight}</td><td>{e.voxels}</td><td>{img(e.png, e.key)}</td>"
                         f"<td><a href='{esc(e.volume)}'>{esc(e.volume)}</a></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Example::", 1)[1]
    parser.add_argument("--image", required=True, help="image: NIfTI, NRRD, MHA file or a DICOM folder")
    parser.add_argument("--teacher", required=True, help="the teacher's model file")
    parser.add_argument("--student", required=True, help="the student's model file (its card names the KD method and taps)")
    parser.add_argument("--labels", help="class ids on the image grid (default: region masks from the teacher's prediction)")
    parser.add_argument("--out", default="inspection", help="output folder (default ./inspection)")
    parser.add_argument("--levels", type=int, nargs="+", metavar="L", help="feature levels to write (default all)")
    parser.add_argument("--roi", nargs=6, type=float, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                        help="only inspect this box: voxel indices i j k (stop excluded) or world mm (--roi-space)")
    parser.add_argument("--roi-space", choices=("ijk", "ras", "lps"), default="ijk", help="coordinates of --roi (default ijk)")
    parser.add_argument("--format", choices=list(FORMATS), default="nrrd", help="volume format (default nrrd)")
    parser.add_argument("--device", default="auto", help="where the segmentation runs: auto, cpu, cuda[:N] (default auto)")
    parser.add_argument("--size", type=int, default=256, help="pixels per rendered view side (default 256)")
    parser.add_argument("--window-level", type=float, nargs=2, metavar=("W", "L"),
                        help="image window and level in the pictures, e.g. 400 40 for abdominal CT (default: percentiles)")
    parser.add_argument("--no-png", action="store_true", help="skip the Slicer-rendered pictures (no render extra needed)")
    add_inference_arguments(parser)
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    def job(reporter) -> None:
        from ReCoKDLib.infer import ROI, resolve_device

        from ReCoKDLib.outputs import check_destination

        roi = ROI.parse(args.roi, args.roi_space) if args.roi else None
        check_destination(args.out, "--out", folder=True)
        inspect_to_folder(args.image, args.teacher, args.student, args.out, labels_path=args.labels,
                          levels=args.levels, roi=roi, fmt=args.format, device=str(resolve_device(args.device)),
                          render=not args.no_png, size=(args.size, args.size),
                          window_level=tuple(args.window_level) if args.window_level else None, reporter=reporter,
                          inference=inference_kwargs(args))

    return run_command(args, STAGE, job, memory_hint="--roi (inspect a box), or fewer --levels")
