"""``recokd tune-overlap MODEL --images ... (--reference MODEL | --labels ...) --out TUNED.pt``:
the sliding-window overlap ``recokd segment`` uses for MODEL, measured (:mod:`ReCoKDLib.overlap`).

Examples::

    # a student, against its teacher's segmentation of the student's own training images
    recokd tune-overlap runs/student/model_last.pt --reference runs/teacher/model_best.pt \\
        --images train/a_0000.nii.gz train/b_0000.nii.gz --out student_tuned.pt
    # any model, against label maps of validation images
    recokd tune-overlap model.pt --images val/c_0000.nii.gz --labels val/c.nii.gz --out model_tuned.pt

MODEL segments every image at each candidate overlap (default 0.5, 0.25, 0.1, 0) through
``recokd segment``'s path; each result is scored (mean Dice over the foreground classes) against
the reference label map of that image; the candidate with the fewest windows within
``--tolerance`` (default 0.005) of the best mean Dice is written into a copy of MODEL's card
(``inference.overlap``; the whole measurement in ``metrics.overlap_choice``). MODEL is not changed.
Use images the model will not be evaluated on. Exit codes (:mod:`ReCoKDLib.commands.runner`): 0
done, 1 failure while running, 2 bad input, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ReCoKDLib.commands.inference_options import add_inference_arguments, inference_kwargs
from ReCoKDLib.commands.runner import run_command
from ReCoKDLib.progress import add_progress_argument

STAGE = "tune-overlap"


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1), got {text!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every overlap must be in [0, 1); got {text!r}")
    return values


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from ReCoKDLib.overlap import CANDIDATES, TOLERANCE

    parser.description = ("Choose the sliding-window overlap recokd segment uses for MODEL: MODEL segments each image at "
                          "every candidate overlap, each result is scored against the reference (mean Dice over the "
                          "foreground classes), and the fewest windows within --tolerance of the best Dice is written "
                          "into a copy of MODEL's card (--out). MODEL itself is not changed.")
    parser.add_argument("model", help="the ReCoKD model file (.pt) whose overlap is chosen, e.g. a distilled student")
    parser.add_argument("--images", nargs="+", required=True, metavar="IMAGE",
                        help="calibration images (NIfTI/NRRD/MHA files or DICOM folders), ideally not the ones the "
                             "model will be evaluated on")
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference", metavar="MODEL",
                     help="a model whose segmentation of each image is the reference (a student's teacher); it must "
                          "name the same classes")
    ref.add_argument("--labels", nargs="+", metavar="LABEL",
                     help="one label map per image, on the image's voxel grid, with the model's class ids")
    parser.add_argument("--out", required=True, help="where to write the model with the chosen overlap (.pt)")
    parser.add_argument("--candidates", type=_fractions, default=list(CANDIDATES), metavar="F,F,...",
                        help=f"overlaps to try (default {','.join(f'{c:g}' for c in CANDIDATES)})")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"mean Dice a smaller overlap may lose against the best candidate (default {TOLERANCE:g})")
    add_inference_arguments(parser)  # MODEL runs as recokd segment would run it with these options
    add_progress_argument(parser)


def _references(args: argparse.Namespace, model, volumes, reporter) -> list:
    """Per image the reference label map: the reference model's segmentation, or the given label file."""
    import numpy as np

    from ReCoKDLib.data.io import check_same_grid, read_image

    if args.labels is not None:
        if len(args.labels) != len(volumes):
            raise ValueError(f"{len(volumes)} image(s) but {len(args.labels)} label map(s): give one per image")
        labels = []
        for (name, image, geometry), path in zip(volumes, args.labels):
            label, label_geometry = read_image(path, allow_channels=False)
            check_same_grid(geometry, label_geometry, image.shape[-3:], label.shape, name, str(path))
            values = np.unique(label)
            if values.min() < 0 or values.max() >= model.card.num_classes:
                raise ValueError(f"{path}: label values {values.tolist()} are not class ids of the model "
                                 f"(0..{model.card.num_classes - 1}: {model.card.classes})")
            labels.append(label.astype(np.int16))
        return labels
    from ReCoKDLib.infer import segment_volume
    from ReCoKDLib.teachers import load_model

    reference = load_model(args.reference, "cpu")
    if list(reference.card.classes) != list(model.card.classes):
        raise ValueError(f"the reference model's classes {reference.card.classes} are not the model's "
                         f"{model.card.classes}")
    reporter.start(STAGE, total=len(volumes), message=f"reference segmentations by {args.reference}")
    labels = []
    for i, (name, image, geometry) in enumerate(volumes):
        labels.append(segment_volume(reference, image, geometry, device="cpu", **inference_kwargs(args)).labels)
        reporter.progress(STAGE, i + 1, len(volumes), message=name)
    return labels


def run(args: argparse.Namespace) -> int:
    def job(reporter) -> None:
        from ReCoKDLib.checkpoint import load_model_file
        from ReCoKDLib.data.io import read_image
        from ReCoKDLib.models.files import is_torchscript_file
        from ReCoKDLib.outputs import check_destination
        from ReCoKDLib.overlap import choose_overlap, measure_overlaps, write_overlap
        from ReCoKDLib.teachers import load_model

        if args.tolerance < 0:
            raise ValueError(f"--tolerance must be >= 0, got {args.tolerance}")
        if Path(args.out).resolve() == Path(args.model).resolve():
            raise ValueError("--out must not be MODEL itself: the tuned model is written as a copy")
        check_destination(args.out, "--out")
        if is_torchscript_file(args.model):  # refused now, not after measuring
            raise ValueError(f"{args.model} is TorchScript: tune-overlap writes the chosen overlap into the card of a "
                             "ReCoKD model file (.pt); pass --overlap to recokd segment instead")
        load_model_file(args.model)  # a ReCoKD model file (its card is rewritten)
        model = load_model(args.model, "cpu")
        volumes = []
        for path in args.images:
            image, geometry = read_image(path, allow_channels=True)
            volumes.append((str(path), image, geometry))
        references = _references(args, model, volumes, reporter)
        trials = measure_overlaps(model, volumes, references, args.candidates, reporter=reporter, stage=STAGE,
                                  **inference_kwargs(args))
        chosen = choose_overlap(trials, args.tolerance)
        source = (f"the segmentation by {args.reference}" if args.reference else "label maps") + \
            f" of {len(volumes)} image(s)"
        out = write_overlap(args.model, args.out, trials, chosen, args.tolerance, reference=source)
        if args.progress == "json":
            reporter.log(STAGE, json.dumps({"chosen": chosen.overlap, "out": str(out),
                                            "trials": [t.to_dict() for t in trials]}))
        else:
            print("overlap  mean Dice  windows  seconds")
            for t in trials:
                print(f"{t.overlap:7g}  {t.dice:9.4f}  {t.windows:7d}  {t.seconds:7.2f}"
                      + ("  <- chosen" if t is chosen else ""))
            print(f"model with overlap {chosen.overlap:g}: {out}")

    return run_command(args, STAGE, job)
