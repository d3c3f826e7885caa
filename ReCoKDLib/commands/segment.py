"""``recokd segment MODEL IMAGE OUT``: segment a volume on its exact grid.

Examples::

    recokd segment runs/student/model_best.pt ct.nii.gz ct_seg.nii.gz
    recokd segment student.pt ct.nrrd seg.nrrd --roi 100 120 10 300 320 60 --mirror --probabilities probs.nrrd
    recokd segment student.pt ct.mha seg.mha --roi -80 -60 -400 40 60 -300 --roi-space ras --device cuda
    recokd segment student.pt scans/*.nii.gz dicom/patient_a/ todo.txt segs/ --dicom-seg segs/dicom/
    recokd segment unet_weights.pt t1.nii.gz seg.nii.gz --entry-point monai.networks.nets:UNet \\
        --kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [16, 32, 64], "strides": [2, 2]}' \\
        --card card.json

The label map (and the optional ``(K, D, H, W)`` probability image) has the input's exact size,
spacing, origin and direction. Every destination is checked to be writable, and never to be an
input (``--overwrite-input`` forces that), before the model is loaded. Exit codes
(:mod:`ReCoKDLib.commands.runner`): 0 done, 1 failure while running (a full disk, out of memory),
2 bad input (missing or unsafe model, unreadable or truncated image, NaN voxels, bad ROI, options
or destination), 130 interrupted, 143 stopped by SIGTERM.

Many cases (several inputs, a folder of scans or of DICOM series, a glob, a ``.txt`` list; OUT a
folder): the model is loaded once, a bar runs over the cases, a failing case is reported and the
others go on, and ``OUT/summary.csv`` lists per case the status, seconds, volume of each segment
in ml and the error (:mod:`ReCoKDLib.batch`); exit 0 when all cases succeeded, 2 when some had bad
input, 1 when some failed while running.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

from ReCoKDLib.commands.runner import run_command
from ReCoKDLib.commands.inference_options import add_inference_arguments, inference_kwargs
from ReCoKDLib.progress import add_progress_argument

STAGE = "segment"
#: what to lower when memory runs out while segmenting
MEMORY_HINT = ("--sw-batch-size (default 1), or segment a box with --roi; drop --mirror and --probabilities; on a GPU, "
               "--device cpu has more memory")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for models that are not ReCoKD model files (TorchScript, entry point + state dict)."""
    group = parser.add_argument_group("foreign models")
    group.add_argument("--entry-point", metavar="PKG.MODULE:FACTORY",
                       help="build the architecture with this factory and read MODEL as its state dict")
    group.add_argument("--kwargs", metavar="JSON", default=None, help="keyword arguments of --entry-point (JSON object)")
    group.add_argument("--card", metavar="JSON",
                       help="model card (classes, spacing, normalization, patch_size) of a TorchScript or entry-point model "
                            "(default: MODEL's sidecar .json)")


def load_from_args(path: str, args: argparse.Namespace, device: str = "cpu"):
    from ReCoKDLib.teachers import load_model

    kwargs = None
    if getattr(args, "kwargs", None):
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kwargs is not a JSON object: {exc}") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--kwargs must be a JSON object; got {args.kwargs!r}")
    return load_model(path, device=device, entry_point=getattr(args, "entry_point", None), kwargs=kwargs,
                      card=getattr(args, "card", None))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("The output lies on the input's exact voxel grid. Exit codes: 0 done, 1 failure while running, "
                     "2 bad input, 130 interrupted, 143 stopped by SIGTERM.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", help="model: a ReCoKD model file (.pt), a TorchScript file, or a state dict with --entry-point")
    parser.add_argument("image", nargs="+", metavar="IMAGE",
                        help="image: NIfTI, NRRD, MHA file or a DICOM folder. Several, a folder of them, a glob "
                             "('scans/*.nii.gz') or a .txt list (one per line) segment many cases with the model "
                             "loaded once; OUT is then a folder (<case>_seg.nii.gz and summary.csv)")
    parser.add_argument("out", help="label map to write (.nii.gz, .nii, .nrrd, .mha), or the folder of many cases")
    parser.add_argument("--channel", action="append", default=[], metavar="IMAGE",
                        help="a further input channel on the same grid (repeatable, in channel order)")
    parser.add_argument("--roi", nargs=6, type=float, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                        help="only segment this box: voxel indices i j k (stop excluded) or world mm (see --roi-space); "
                             "background outside")
    parser.add_argument("--roi-space", choices=("ijk", "ras", "lps"), default="ijk",
                        help="coordinates of --roi: voxel indices, RAS mm (Slicer) or LPS mm (DICOM/ITK) (default ijk)")
    parser.add_argument("--mirror", action="store_true", help="test-time mirroring on all three axes (8 passes)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap in [0, 1) (default: the one the model card names, else 0.5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16/bf16 on CUDA)")
    parser.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--probabilities", metavar="PATH", help="also write the (K, D, H, W) class probabilities here")
    parser.add_argument("--dicom-seg", metavar="PATH",
                        help="also write the result as a DICOM SEG object referencing the input series, for a PACS "
                             "(IMAGE must be a DICOM series folder; with many cases a folder receiving <case>_seg.dcm "
                             "for each DICOM case; dicom extra)")
    parser.add_argument("--png", metavar="DIR",
                        help="also write Slicer-rendered axial/coronal/sagittal/3D pictures of the result here (render extra)")
    parser.add_argument("--format", choices=("nii.gz", "nii", "nrrd", "mha"), default="nii.gz",
                        help="file format of the label maps of many cases (default nii.gz)")
    parser.add_argument("--summary", metavar="CSV", help="where many cases' summary goes (default OUT/summary.csv)")
    parser.add_argument("--replace-nonfinite", metavar="VALUE", default=None,
                        help="replace NaN/inf voxels of the image by VALUE (a number, or 'min': the smallest finite "
                             "voxel) and say how many; without it such an image is refused")
    parser.add_argument("--overwrite-input", action="store_true",
                        help="allow an output to be the input file itself (refused otherwise: it would destroy the scan)")
    add_model_arguments(parser)
    add_inference_arguments(parser)
    add_progress_argument(parser)


def _engine(result) -> str:
    """``"openvino bf16"``: what ran the network (``ReCoKDLib.models.backends``)."""
    record = result.info.get("backend") or {}
    return f"{record.get('backend') or 'no network run'} {record.get('precision') or ''}".strip()


def _check_window_options(args: argparse.Namespace) -> None:
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise ValueError(f"--overlap must be in [0, 1); got {args.overlap}")
    if args.sw_batch_size < 1:
        raise ValueError(f"--sw-batch-size must be at least 1; got {args.sw_batch_size}")


def _check_destinations(args: argparse.Namespace, inputs: list, folders: bool = False) -> None:
    """Every output can be written, and none is an input, before any model is loaded."""
    from ReCoKDLib.outputs import check_destination, check_not_input

    targets = [("OUT", args.out, folders), ("--probabilities", args.probabilities, False),
               ("--dicom-seg", args.dicom_seg, folders or args.dicom_seg and str(args.dicom_seg).endswith("/")),
               ("--png", args.png, True), ("--summary", getattr(args, "summary", None) if folders else None, False)]
    check_not_input([(what, path) for what, path, _ in targets], inputs + list(args.channel or []) + [args.model],
                    force=args.overwrite_input)
    for what, path, folder in targets:
        if path:
            check_destination(path, what, folder=bool(folder))


def _nonfinite(args: argparse.Namespace):
    """The non-finite voxel policy of ``--replace-nonfinite`` (refuse without it)."""
    from ReCoKDLib.data.io import nonfinite_policy

    return nonfinite_policy("error" if args.replace_nonfinite is None else args.replace_nonfinite)


def _batch_job(args: argparse.Namespace, reporter) -> None:
    """Many cases (:mod:`ReCoKDLib.batch`): one model load, a bar over cases, a failing case
    reported and skipped, summary.csv; exit 1 when a case failed on a run error, 2 on bad input."""
    from ReCoKDLib.batch import expand_inputs, segment_cases
    from ReCoKDLib.infer import ROI, resolve_device

    _check_window_options(args)
    if args.channel or args.probabilities:
        raise ValueError("--channel and --probabilities apply to one case; segment those cases one by one")
    cases = expand_inputs(args.image)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; with several cases OUT is the folder to write them to")
    _check_destinations(args, [c.image for c in cases], folders=True)
    out.mkdir(parents=True, exist_ok=True)
    for folder in (args.png, args.dicom_seg):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    if args.png:
        from ReCoKDLib.mrml.views import require_render_extra

        require_render_extra()
    if args.dicom_seg:
        from ReCoKDLib.data.dicom_seg import require_highdicom

        require_highdicom()

    def pictures(case, result) -> None:
        from ReCoKDLib.data.io import read_image
        from ReCoKDLib.mrml.views import render_segmentation_pngs

        image, geometry = read_image(case.image, allow_channels=True, nonfinite="keep")
        render_segmentation_pngs(image, geometry, result.labels, result.class_names, args.png, prefix=f"{case.case_id}_")

    model = load_from_args(args.model, args, "cpu")
    with _nonfinite(args):
        results = segment_cases(
            model, cases, out, suffix=f".{args.format}", summary_path=args.summary, dicom_seg_dir=args.dicom_seg,
            reporter=reporter, after_case=pictures if args.png else None, roi=ROI.parse(args.roi, args.roi_space)
            if args.roi else None, mirror=args.mirror, overlap=args.overlap, device=resolve_device(args.device),
            sw_batch_size=args.sw_batch_size, **inference_kwargs(args))
    failed = [r for r in results if r.status != "ok"]
    summary = args.summary or out / "summary.csv"
    message = f"{len(results) - len(failed)} of {len(results)} case(s) segmented into {out}; summary {summary}"
    if failed:
        names = ", ".join(r.case.case_id for r in failed[:5]) + (", ..." if len(failed) > 5 else "")
        error = (OSError if any(r.kind == "run" for r in failed) else ValueError)
        raise error(f"{message}; failed: {names} (reasons in the summary)")
    reporter.done("batch", path=str(summary), cases=len(results), message=message)


def run(args: argparse.Namespace) -> int:
    from ReCoKDLib.batch import is_batch

    if isinstance(args.image, list) and is_batch(args.image, args.out):
        return run_command(args, "batch", partial(_batch_job, args), memory_hint=MEMORY_HINT)
    if isinstance(args.image, list):
        args.image = args.image[0]

    def job(reporter) -> None:
        from ReCoKDLib.infer import ROI, resolve_device, segment_file

        _check_window_options(args)
        device = resolve_device(args.device)
        roi = ROI.parse(args.roi, args.roi_space) if args.roi else None
        if getattr(args, "png", None):
            from ReCoKDLib.mrml.views import require_render_extra

            require_render_extra()  # fail before the (long) inference, not after
        if getattr(args, "dicom_seg", None):
            from ReCoKDLib.data.dicom_seg import check_dicom_seg_source

            check_dicom_seg_source(args.image)
        _check_destinations(args, [args.image])
        model = load_from_args(args.model, args, "cpu")
        images = [args.image] + list(args.channel)
        with _nonfinite(args):
            result = segment_file(model, images if len(images) > 1 else args.image, args.out, roi=roi,
                                  mirror=args.mirror, overlap=args.overlap, device=device,
                                  probabilities_path=args.probabilities, reporter=reporter,
                                  sw_batch_size=args.sw_batch_size, **inference_kwargs(args))
        counts = {name: int((result.labels == i).sum()) for i, name in enumerate(result.class_names) if i}
        if getattr(args, "png", None):
            from ReCoKDLib.data.io import read_image
            from ReCoKDLib.mrml.views import render_segmentation_pngs

            image, geometry = read_image(args.image, allow_channels=True, nonfinite="keep")
            render_segmentation_pngs(image, geometry, result.labels, result.class_names, args.png,
                                     prefix=f"{Path(args.out).name.split('.')[0]}_")
        # classes and colours let a parent process (the Slicer module) name and colour the segments
        # without loading the model itself
        colors = getattr(model.card, "colors", None)
        if getattr(args, "dicom_seg", None):
            from ReCoKDLib.data.dicom_seg import write_dicom_seg

            written = write_dicom_seg(result.labels, result.geometry, args.image, result.class_names, args.dicom_seg,
                                      colors=model.card.colors or None, algorithm=Path(args.model).name)
            for note in written.notes:
                reporter.warning(STAGE, f"DICOM SEG: {note}")
        reporter.done(STAGE, path=str(Path(args.out)), seconds=round(result.seconds, 3), voxels=counts,
                      classes=list(result.class_names), colors=list(colors) if colors else None,
                      backend=_engine(result), window=result.info.get("window"),
                      message=f"wrote {args.out} ({result.seconds:.1f} s on {result.device}, {_engine(result)})")

    return run_command(args, STAGE, job, memory_hint=MEMORY_HINT)
