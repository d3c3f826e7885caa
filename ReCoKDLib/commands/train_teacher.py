"""``recokd train-teacher``: train the built-in 3D U-Net teacher on a labelled dataset.

Example::

    recokd train-teacher --data Dataset001_Organs --arch ct_demo --spacing 3,1.5,1.5 \\
        --patch 16,96,96 --steps 1000 --out runs/teacher --progress json
    recokd train-teacher --pairs ct.nii.gz:seg.nii.gz ct2.nii.gz:seg2.nii.gz \\
        --classes background,liver,spleen --out runs/teacher --resume

The options shared with ``recokd distill`` (data, budget, optimiser, device, resume) are defined
here (:func:`add_data_arguments`, :func:`add_training_arguments`) and reused there.
One run at a time per ``--out`` folder (``OUT/.recokd.lock`` names the owner; a lock left by a killed
run is taken over with a warning). Exit codes (:mod:`ReCoKDLib.commands.runner`): 0 done (also when
stopped by ``<out>/STOP``: the ``done`` event says ``"cancelled": true``), 1 a failure while running,
2 bad input or a busy run folder, 130 interrupted, 143 stopped by SIGTERM (checkpoint written; the
message gives the command that continues the run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from ReCoKDLib.progress import add_progress_argument

STAGE = "train-teacher"


# ---------------------------------------------------------------------------------------------
# Shared argument groups


def _triple(text: str, kind=float) -> tuple:
    parts = [kind(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected one value or three (D,H,W), got {text!r}")
    return tuple(parts)


def int_triple(text: str) -> tuple[int, int, int]:
    """``"16,96,96"``, ``"16x96x96"`` or ``"64"`` -> ``(D, H, W)`` ints."""
    try:
        return _triple(text, int)  # type: ignore[return-value]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers D,H,W, got {text!r}") from None


def float_triple(text: str) -> tuple[float, float, float]:
    try:
        return _triple(text, float)  # type: ignore[return-value]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers D,H,W, got {text!r}") from None


def add_data_arguments(parser: argparse.ArgumentParser, images: bool = False) -> None:
    """``--data`` / ``--pairs`` / ``--classes`` / ``--cache-dir`` (and ``--images`` when ``images``)."""
    group = parser.add_argument_group("data")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FOLDER",
                        help="dataset folder in nnU-Net v2 raw layout (dataset.json, imagesTr, labelsTr)")
    if images:
        source.add_argument("--images", nargs="+", metavar="IMAGE_OR_FOLDER",
                            help="unlabelled training images (files, or folders of .nii.gz/.nii/.nrrd/.mha): "
                                 "label-free distillation on the teacher's predictions")
    source.add_argument("--pairs", nargs="+", metavar="IMAGE:LABEL",
                        help="training cases as image:label file pairs (NIfTI, NRRD, MHA); needs --classes")
    group.add_argument("--classes", metavar="NAMES",
                       help="comma-separated class names for --pairs, background first (e.g. background,liver,spleen)")
    group.add_argument("--cache-dir", metavar="DIR",
                       help="where preprocessed cases are cached (default: OUT/preprocessed); reused across runs")
    group.add_argument("--val-cases", type=int, default=1, metavar="N",
                       help="hold out the last N training cases for validation Dice (0: no validation; default 1)")


def add_training_arguments(parser: argparse.ArgumentParser, default_steps: int = 1000) -> None:
    """Budget, optimiser, checkpoints, device and progress options."""
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: checkpoint.pt, model_best.pt, model_last.pt (+ .json cards), history.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out exactly where it stopped (crash, kill, cancel)")
    g = parser.add_argument_group("training")
    g.add_argument("--patch", type=int_triple, metavar="D,H,W",
                   help="training patch in voxels, a multiple of the network's stride product per axis")
    g.add_argument("--steps", type=int, default=default_steps, help=f"optimiser steps (the budget; default {default_steps})")
    g.add_argument("--batch", type=int, default=2, help="patches per step (per process under torchrun; default 2)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="SGD (momentum 0.99, Nesterov; nnU-Net) or AdamW (default sgd)")
    g.add_argument("--lr", type=float, help="initial learning rate, poly decay (default 0.01 for sgd, 2e-3 for adamw)")
    g.add_argument("--weight-decay", type=float, default=3e-5, help="weight decay (default 3e-5)")
    g.add_argument("--grad-clip", type=float, default=12.0, help="gradient norm clip, 0 = off (default 12)")
    g.add_argument("--ema-decay", type=float, default=0.999,
                   help="EMA decay of the weights that are validated and saved; 0 = no EMA (default 0.999)")
    g.add_argument("--val-every", type=int, default=250, help="validate (and checkpoint) every N steps (default 250)")
    g.add_argument("--checkpoint-every", type=int, default=50, help="write the resumable checkpoint every N steps (default 50)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop after N validations without a better mean Dice; 0 = never (default 0)")
    g.add_argument("--oversample", type=float, default=0.33,
                   help="share of patches centred on a foreground voxel (default 0.33)")
    g.add_argument("--no-augment", action="store_true", help="turn off spatial and intensity augmentation")
    g.add_argument("--flip", action="store_true",
                   help="add random flips of all axes (off by default: left/right classes would be confused)")
    g.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    g.add_argument("--inference-overlap", type=float, default=None, metavar="F",
                   help="sliding-window overlap in [0, 1) that recokd segment uses for the model made, kept in its "
                        "card (default: none kept, so 0.5). 0.25 slides 3/4 of a window: fewer windows, faster; "
                        "measure what it costs in labels first")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower; exact reruns)")
    d = parser.add_argument_group("device")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    d.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU (default fp32 on CPU)")
    d.add_argument("--no-amp", action="store_true", help="no autocast on CUDA (default: bf16, or fp16 without bf16)")
    d.add_argument("--log-every", type=int, default=1, help="a progress event every N steps (default 1)")
    add_progress_argument(parser)


def training_config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~ReCoKDLib.engine.TrainConfig` fields the shared options set."""
    from ReCoKDLib.data.sampling import AugmentationConfig

    augmentation = AugmentationConfig(enabled=not args.no_augment, flip_axes=(0, 1, 2) if args.flip else ())
    fields = dict(
        batch_size=args.batch, steps=args.steps, optimizer=args.optimizer,
        lr=args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 2e-3),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay,
        val_every=args.val_every, checkpoint_every=args.checkpoint_every, patience=args.patience,
        num_val_cases=args.val_cases, oversample_foreground=args.oversample, augmentation=augmentation.to_dict(),
        seed=args.seed, deterministic=args.deterministic, device=args.device, bf16=args.bf16, amp=not args.no_amp,
        log_every=args.log_every, inference_overlap=args.inference_overlap,
    )
    if args.patch is not None:
        fields["patch_size"] = tuple(args.patch)
    return fields


def open_dataset(args: argparse.Namespace):
    """The ``RawDataset`` of ``--data`` or ``--pairs``/``--classes`` (``--no-labels``: label files optional)."""
    from ReCoKDLib.data.layout import RawDataset

    if args.data:
        return RawDataset.open(args.data, labels_required=not getattr(args, "no_labels", False))
    if not args.classes:
        raise ValueError("--pairs needs --classes (comma-separated class names, background first)")
    pairs = []
    for item in args.pairs:
        image, sep, label = item.rpartition(":")
        if not sep or not image or not label:
            raise ValueError(f"--pairs item {item!r} is not IMAGE:LABEL")
        pairs.append((image, label))
    return RawDataset.from_pairs(pairs, [c.strip() for c in args.classes.split(",") if c.strip()])


def prepare_case_set(raw, class_names: Sequence[str], spacing, normalization: dict, cache_dir: Path, reporter,
                     allow_unlabelled: bool = False):
    """Preprocess (cached) the training cases of ``raw`` on ``spacing`` with ``normalization``
    (``allow_unlabelled``: cases without labels are kept for label-free distillation)."""
    from ReCoKDLib.data.preprocess import preprocess_case
    from ReCoKDLib.data.sampling import prepare_cases

    cases = raw.training_cases()
    reporter.start("preprocess", total=len(cases))

    def on_case(i, n, case_id, cached):
        reporter.progress("preprocess", i, n, message=f"{case_id} ({'cache' if cached else 'preprocessed'})")

    case_set = prepare_cases(cases, class_names, preprocess_case,
                             {"spacing": [float(s) for s in spacing], "normalization": normalization},
                             cache_dir, on_case, allow_unlabelled=allow_unlabelled,
                             label_spec=getattr(raw, "label_spec", None))  # nnU-Net regions / ignore label
    reporter.done("preprocess", path=str(cache_dir))
    return case_set


def run_job(args: argparse.Namespace, stage: str, job) -> int:
    """Run ``job(reporter)`` under the CLI's convention (:func:`ReCoKDLib.commands.runner.run_command`),
    holding the run folder ``--out`` (one run at a time) for the whole job; returns the exit code."""
    from ReCoKDLib.commands.runner import resume_command, run_command

    return run_command(args, stage, job, lock=args.out, resume_hint=f"continue with: {resume_command()}",
                       memory_hint="--batch or --patch (or train a thinner student: --reduction)")


# ---------------------------------------------------------------------------------------------
# train-teacher


def _architecture(text: str) -> dict[str, Any]:
    """A preset name, a JSON file or a JSON object -> ``UNetConfig`` dict."""
    from ReCoKDLib.networks import PRESETS, UNetConfig, preset

    if text in PRESETS:
        return preset(text).to_dict()
    path = Path(text)
    data = json.loads(path.read_text()) if path.is_file() else None
    if data is None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--arch {text!r} is neither a preset ({', '.join(PRESETS)}), a JSON file nor a JSON object") from None
    if isinstance(data, dict) and data.get("kind") == "dynunet":
        data = data["config"]
    return UNetConfig.from_dict(data).to_dict()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes OUT/model_best.pt and OUT/model_last.pt (ReCoKD model files with JSON cards). "
                     "Cancel with SIGTERM or by creating OUT/STOP; continue with --resume.")
    add_data_arguments(parser)
    net = parser.add_argument_group("teacher")
    net.add_argument("--arch", default="nnunet",
                     help="architecture: a preset (nnunet, ct_demo, tiny), a JSON file or a JSON object of UNetConfig "
                          "fields (default nnunet)")
    net.add_argument("--spacing", type=float_triple, metavar="D,H,W",
                     help="target voxel spacing in mm, (z, y, x) order (default: the median of the training cases)")
    net.add_argument("--normalization", choices=("ct", "zscore", "none"), default="ct",
                     help="intensity normalisation: CT foreground percentiles, per-volume z-score (MR) or none (default ct)")
    add_training_arguments(parser)


def _median_spacing(raw) -> list[float]:
    import numpy as np

    from ReCoKDLib.data.io import read_image

    spacings = [read_image(case.image_paths[0])[1].spacing[::-1] for case in raw.training_cases()]
    return [float(s) for s in np.median(np.asarray(spacings), axis=0)]


def _normalization(raw, scheme: str) -> dict[str, Any]:
    from ReCoKDLib.data.preprocess import compute_normalization

    if scheme != "ct":
        return compute_normalization([], None, scheme=scheme)
    images, labels = [], []
    for case in raw.training_cases():
        image, label, _ = raw.load_case(case)
        images.append(image)
        labels.append(label)
    return compute_normalization(images, labels, scheme="ct")


def run(args: argparse.Namespace) -> int:
    def job(reporter):
        from ReCoKDLib.engine import TrainConfig, train_teacher

        out = Path(args.out)
        raw = open_dataset(args)
        architecture = _architecture(args.arch)
        spacing = list(args.spacing) if args.spacing else _median_spacing(raw)
        normalization = _normalization(raw, args.normalization)
        fields = training_config_fields(args)
        fields.setdefault("patch_size", (64, 64, 64))
        config = TrainConfig(network=architecture, **fields)
        case_set = prepare_case_set(raw, raw.class_names, spacing, normalization,
                                    Path(args.cache_dir) if args.cache_dir else out / "preprocessed", reporter)
        train_teacher(config, case_set, out, reporter, resume=args.resume)

    return run_job(args, STAGE, job)
