"""``recokd distill``: distill a compact student from a frozen teacher.

Example::

    recokd distill runs/teacher/model_best.pt --data Dataset001_Organs --reduction 4 \\
        --kd recokd --kd-weight 0.01 --steps 1000 --out runs/student --progress json
    recokd distill teacher.pt --pairs ct.nii.gz:seg.nii.gz --classes background,liver \\
        --kd recokd:1,logit:0.5 --kd-option recokd.stage_alpha=0.5 --out runs/s2 --resume

Label-free (no annotation needed)::

    recokd distill preset:hd-bet --images ~/.cache/recokd/Dataset904_T1Heads/imagesTr \
        --student-json student.json --teacher-taps network.loc3,network.loc2 \
        --student-taps downsamples.0,downsamples.1 --kd recokd:1,logit:1 --out runs/bet_student
    recokd distill teacher.pt --data Dataset001 --no-labels --out runs/s3   # ignore the labels

Cases without a label (``--images``, or every case with ``--no-labels``) are trained on the
teacher's predictions: **hard** targets (Dice + CE on the teacher's argmax, weighted by
``--pseudo-label-weight``, default 1; 0 turns them off) and **soft** targets through the KD
methods (``--kd logit`` is KL to the teacher's softened probabilities); ReCo-KD's class-aware region
masks come from the teacher's argmax. With partial labels (``--data`` plus ``--images``) the real
labels of labelled cases always take precedence. The teacher may be a preset (``preset:hd-bet``).
``--no-labels`` on a dataset whose ``dataset.json`` has a ``label_free_split`` (the T1 heads of
``recokd data fetch``) trains on its ``train`` cases and leaves its ``test`` cases out.

Teacher outputs (``--teacher-outputs``): ``cache`` computes the frozen teacher's logits (and features
at the taps, when a KD method reads them) once per training case on the whole volume, stores them
as float16 and crops/augments them with each patch, so training runs at the student's speed;
``live`` runs the teacher on every patch; ``auto`` (default) caches when every case fits one exact
whole-volume pass (see ``ReCoKDLib.engine.teacher_cache``).

The student is the teacher's architecture with every width divided by ``--reduction`` (ReCo-KD's
``2**t``), or ``--student-json``. Cases are preprocessed on the teacher's spacing and
normalisation (from its model card). One run at a time per ``--out`` folder; exit codes as ``recokd
train-teacher`` (0 done, 1 failure, 2 bad input or a busy folder, 130 interrupted, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ReCoKDLib.commands.train_teacher import (
    add_data_arguments,
    add_training_arguments,
    open_dataset,
    prepare_case_set,
    run_job,
    training_config_fields,
)

STAGE = "distill"


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def kd_spec_from_args(kd: str, options: list[str]) -> dict[str, dict[str, Any]]:
    """``--kd`` and repeated ``--kd-option [METHOD.]KEY=VALUE`` -> ``{method: {"weight": w, KEY: VALUE}}``.

    A KEY without ``METHOD.`` applies to the only method (an error when several are given).
    VALUE is read as JSON when it parses (numbers, true/false, lists), else as a string.
    """
    from ReCoKDLib.losses.registry import parse_kd_spec

    spec = parse_kd_spec(kd)
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--kd-option {item!r} is not KEY=VALUE (or METHOD.KEY=VALUE)")
        method, dot, name = key.partition(".")
        if not dot:
            if len(spec) != 1:
                raise ValueError(f"--kd-option {item!r}: several KD methods {list(spec)}; write METHOD.{key}={value}")
            method, name = next(iter(spec)), key
        if method not in spec:
            raise ValueError(f"--kd-option {item!r} names method {method!r}, which is not in --kd ({list(spec)})")
        spec[method][name] = _value(value)
    return spec


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes OUT/model_best.pt and OUT/model_last.pt (the student, with JSON cards holding the KD "
                     "configuration and the teacher's SHA-256). Cancel with SIGTERM or OUT/STOP; continue with --resume.")
    parser.add_argument("teacher", help="teacher model: a ReCoKD model file (.pt), a TorchScript file, a state dict "
                                        "with --teacher-entry-point, or a teacher preset (preset:hd-bet or a preset "
                                        "JSON file)")
    t = parser.add_argument_group("teacher and student")
    t.add_argument("--teacher-entry-point", metavar="PKG.MODULE:FACTORY",
                   help="build the teacher architecture with this factory and load TEACHER as its state dict")
    t.add_argument("--teacher-kwargs", metavar="JSON", type=_json_object, default=None,
                   help="keyword arguments of --teacher-entry-point, as a JSON object or a JSON file")
    t.add_argument("--teacher-card", metavar="JSON",
                   help="model card of a TorchScript / entry-point teacher (classes, spacing, normalisation, patch)")
    t.add_argument("--reduction", type=int, choices=(1, 2, 4, 8), default=4,
                   help="student widths = teacher widths / REDUCTION, at least --min-channels (default 4)")
    t.add_argument("--min-channels", type=int, default=8, help="floor of the student's widths (default 8)")
    t.add_argument("--student-norm", choices=("instance", "batch"), default=None,
                   help="the student's normalisation (default: the teacher's, instance norm for nnU-Net-like "
                        "U-Nets). batch: fixed statistics at inference, so Segment runs the student on the largest "
                        "window memory allows (a whole CT in one or a few windows) instead of overlapping "
                        "training-patch windows: much faster on a CPU. Built-in U-Net teachers only")
    t.add_argument("--student-stem", choices=("full", "strided"), default="full",
                   help="strided: the student drops the teacher's full-resolution first stage (its next stage "
                        "becomes a strided stem, logits upsampled): a thin student's full-resolution layers are most "
                        "of its CPU time (benchmarks/student_architecture_speed.py). KD taps: the teacher's at the "
                        "student's strides. Built-in U-Net teachers only (default full)")
    t.add_argument("--student-json", metavar="JSON",
                   help="explicit student architecture (UNetConfig fields) as a file or a JSON object")
    t.add_argument("--teacher-taps", metavar="NAMES", help="comma-separated teacher module names to distil "
                                                           "(default: the card's tap names / encoder stages)")
    t.add_argument("--student-taps", metavar="NAMES", help="comma-separated student module names, one per teacher tap")
    k = parser.add_argument_group("distillation")
    k.add_argument("--kd", default="recokd",
                   help="KD method(s) and their relative weights: 'recokd', 'recokd:1,logit:0.5' (default recokd)")
    k.add_argument("--kd-weight", type=float, default=0.01, help="lambda of the KD loss after warm-up (default 0.01)")
    k.add_argument("--kd-warmup", type=int, metavar="STEPS",
                   help="steps of linear lambda warm-up from 0 (default: 60%% of --steps; 0 = none)")
    k.add_argument("--kd-option", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="an option of a KD method (repeatable), e.g. stage_alpha=0.5 or logit.temperature=4")
    k.add_argument("--frozen-aux", action="store_true",
                   help="keep adapters and KD-loss modules frozen at initialisation (the authors' release behaviour)")
    k.add_argument("--teacher-outputs", choices=("auto", "cache", "live"), default="auto",
                   help="cache: the teacher runs once per training case on the whole volume and its outputs "
                        "(float16 logits, plus features at the taps when a KD method reads them) are read with each "
                        "patch, same spatial augmentation; costs 2 x (K + sum C_l / s_l^3) bytes per voxel on disk "
                        "(HD-BET + ReCo-KD: ~18 B/voxel, ~40 MB per head; logits only: 4 B/voxel) and one teacher pass "
                        "per case. Exact (the teacher's whole-volume output) when the volume fits one pass; larger "
                        "volumes run by sliding window (not exact at the seams). live: the teacher runs on every "
                        "patch (sees the augmented patch only). auto (default): cache when every case fits one "
                        "exact pass, else live")
    k.add_argument("--teacher-cache-dir", metavar="DIR",
                   help="folder of the teacher-output cache (default OUT/teacher_cache); entries are keyed by teacher, "
                        "case and preprocessing, so one folder can serve many runs")
    lf = parser.add_argument_group("label-free distillation")
    lf.add_argument("--no-labels", action="store_true",
                    help="ignore the dataset's labels: train on the teacher's predictions only")
    lf.add_argument("--pseudo-label-weight", type=float, default=1.0, metavar="W",
                    help="weight of Dice + CE on the teacher's argmax for unlabelled cases (hard targets; "
                         "0 = soft targets from the KD methods only; default 1)")
    add_data_arguments(parser, images=True)
    add_training_arguments(parser)


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object given inline or as a file (argparse type)."""
    path = Path(text)
    try:
        data = json.loads(path.read_text()) if path.is_file() else json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON object or JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"spatial_dims\": 3}'")
    return data


def _json_arg(text: str) -> dict[str, Any]:
    path = Path(text)
    data = json.loads(path.read_text()) if path.is_file() else json.loads(text)
    if isinstance(data, dict) and data.get("kind") == "dynunet":
        data = data["config"]
    return data


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_cases(items: list[str]) -> list:
    """``layout.Case`` objects without labels from image files and folders (sorted, one channel)."""
    from ReCoKDLib.data.layout import Case

    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"--images: {path} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {items}")
    cases, seen = [], set()
    for path in files:
        name = path.name
        stem = next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.lower().endswith(s)), name)
        stem = stem[:-5] if stem.endswith("_0000") else stem
        while stem in seen:
            stem += "_"
        seen.add(stem)
        cases.append(Case(stem, [path], None))
    return cases


def _training_cases(args: argparse.Namespace, teacher_classes: list[str]) -> list:
    """Cases of ``--data``/``--pairs`` (labels dropped with ``--no-labels``) or ``--images``."""
    from ReCoKDLib.data.layout import Case

    if getattr(args, "images", None):
        return image_cases(args.images)
    raw = open_dataset(args)  # with --no-labels, labelsTr/ may be missing or partial
    if not args.no_labels and raw.num_classes != len(teacher_classes):
        raise ValueError(f"the dataset has {raw.num_classes} classes {raw.class_names}, the teacher "
                         f"{len(teacher_classes)} {teacher_classes}: label maps must use the teacher's classes")
    cases = raw.training_cases()
    if args.no_labels:
        cases = label_free_cases(raw) or cases
        cases = [Case(c.case_id, c.image_paths, None) for c in cases]
    return cases


def label_free_cases(raw) -> list:
    """The ``train`` cases of ``dataset.json``'s ``label_free_split`` (from imagesTr or imagesTs), or
    ``[]`` when the dataset has no such split; an id the split names but the folder lacks is an error."""
    split = raw.meta.get("label_free_split") if isinstance(raw.meta, dict) else None
    if not split:
        return []
    if not isinstance(split, dict) or not isinstance(split.get("train"), list) or not split["train"]:
        raise ValueError(f"{raw.root}/dataset.json: label_free_split must be an object with a non-empty 'train' list "
                         "of case ids (and optionally 'test')")
    available = {c.case_id: c for c in raw.training_cases() + raw.test_cases()}
    missing = [c for c in split["train"] if c not in available]
    if missing:
        raise ValueError(f"{raw.root}: label_free_split names cases {missing} that are in neither imagesTr/ nor imagesTs/")
    return [available[c] for c in split["train"]]


def _load_teacher(args: argparse.Namespace):
    from types import SimpleNamespace

    from ReCoKDLib.checkpoint import sha256_file
    from ReCoKDLib.teachers import load_model

    loaded = load_model(args.teacher, "cpu", entry_point=args.teacher_entry_point, kwargs=args.teacher_kwargs,
                        card=args.teacher_card)
    source = loaded.source if Path(loaded.source).is_file() else args.teacher
    if Path(source).is_dir():  # an nnU-Net model folder: one hash over its fold checkpoints
        import hashlib

        paths = getattr(getattr(loaded, "folder", None), "checkpoint_paths", None) or sorted(Path(source).glob("fold_*/*.pth"))
        sha = hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()
        return SimpleNamespace(network=loaded.network, card=loaded.card, sha256=sha, kind=loaded.kind, source=str(source))
    return SimpleNamespace(network=loaded.network, card=loaded.card, sha256=sha256_file(source), kind=loaded.kind)


def run(args: argparse.Namespace) -> int:
    def job(reporter):
        from ReCoKDLib.engine import TrainConfig, distill

        out = Path(args.out)
        spec = kd_spec_from_args(args.kd, args.kd_option)
        teacher = _load_teacher(args)
        cases = _training_cases(args, list(teacher.card.classes))
        fields = training_config_fields(args)
        fields.setdefault("patch_size", tuple(teacher.card.patch_size))
        config = TrainConfig(
            kd=spec, kd_weight=args.kd_weight, kd_warmup_steps=args.kd_warmup, frozen_aux=args.frozen_aux,
            student_reduction=args.reduction, min_channels=args.min_channels, student_norm=args.student_norm,
            student_stem=args.student_stem,
            student_config=_json_arg(args.student_json) if args.student_json else None,
            teacher_taps=args.teacher_taps.split(",") if args.teacher_taps else None,
            student_taps=args.student_taps.split(",") if args.student_taps else None,
            pseudo_label_weight=args.pseudo_label_weight, teacher_outputs=args.teacher_outputs,
            teacher_cache_dir=args.teacher_cache_dir,
            **fields,
        )
        case_set = prepare_case_set(SimpleNamespace(training_cases=lambda: cases), teacher.card.classes,
                                    teacher.card.spacing, teacher.card.normalization,
                                    Path(args.cache_dir) if args.cache_dir else out / "preprocessed", reporter,
                                    allow_unlabelled=True)
        distill(config, teacher, case_set, out, reporter, resume=args.resume)

    return run_job(args, STAGE, job)
