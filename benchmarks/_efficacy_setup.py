"""What :mod:`efficacy` compares: the KD methods with their candidate settings, the datasets'
setups and the step budgets (CPU, GPU, smoke). Data only: nothing here trains or reads a file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Candidate:
    """One KD hyper-parameter setting: lambda (``kd_weight``) and options of the loss (e.g. temperature)."""

    kd_weight: float
    options: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in sorted(self.options.items()))
        return f"lambda={self.kd_weight:g}{extra}"


@dataclass(frozen=True)
class Method:
    """A student training recipe: a KD loss (``losses.registry`` name, ``None`` = plain student:
    Dice + CE only) with three candidate settings chosen on validation (:func:`select_candidate`).

    The middle candidate is the published default (kd-methods.md §2.7, §4.1: ReCo-KD and its parts
    lambda 0.01, CIRKD 0.1, the others 1.0); the others are a decade below and above, and for logit
    KD the temperature (1 or 4) is chosen too.
    """

    kd: str | None
    candidates: tuple[Candidate, ...] = ()
    frozen_aux: bool = False
    description: str = ""
    student_norm: str | None = None  # None: the teacher's (instance); "batch": a fully convolutional student
    student_stem: str = "full"  # "strided": no full-resolution stage (recokd distill --student-stem strided)

    @property
    def baseline(self) -> str:
        """The plain student a KD run is compared with: the one of the same architecture (``none``,
        ``none_bn``, ``none_stem`` or ``none_bn_stem``); every plain student is compared with ``none``."""
        if self.kd is None:
            return "none"
        return "none" + ("_bn" if self.student_norm == "batch" else "") + ("_stem" if self.student_stem == "strided" else "")

    def kd_spec(self, candidate: Candidate) -> dict[str, dict[str, Any]]:
        return {self.kd: {"weight": 1.0, **candidate.options}}

    def to_dict(self) -> dict[str, Any]:
        return {"kd": self.kd, "frozen_aux": self.frozen_aux, "description": self.description,
                "candidates": [dataclasses.asdict(c) for c in self.candidates], "student_norm": self.student_norm,
                "student_stem": self.student_stem, "baseline": self.baseline}


def _decade(name: str, default: float, description: str, frozen: bool = False, student_norm: str | None = None,
            student_stem: str = "full") -> Method:
    return Method(name, tuple(Candidate(default * f) for f in (0.1, 1.0, 10.0)), frozen, description, student_norm,
                  student_stem)


METHODS: dict[str, Method] = {
    "none": Method(None, (), False, "plain student: Dice + CE, no distillation"),
    "logit": Method("logit", (Candidate(1.0, {"temperature": 1.0}), Candidate(1.0, {"temperature": 4.0}),
                              Candidate(10.0, {"temperature": 4.0})), False, "logit KD (KL, temperature)"),
    "mskd": _decade("mskd", 1.0, "MSKD: feature filtering + region graph"),
    "recokd": _decade("recokd", 0.01, "ReCo-KD: MS-SARD + MS-CA, trainable adapters and context blocks"),
    "recokd_frozen_aux": _decade("recokd", 0.01, "ReCo-KD with the code release's frozen adapters (frozen_aux)",
                                 frozen=True),
    "none_bn": Method(None, (), False, "plain student with batch norm (fully convolutional: segments in one large "
                                      "window)", "batch"),
    "recokd_bn": _decade("recokd", 0.01, "ReCo-KD, student with batch norm (fully convolutional)", student_norm="batch"),
    "none_stem": Method(None, (), False, "plain student with a strided stem (no full-resolution stage: "
                                        "recokd distill --student-stem strided)", student_stem="strided"),
    "recokd_stem": _decade("recokd", 0.01, "ReCo-KD, student with a strided stem", student_stem="strided"),
    "none_bn_stem": Method(None, (), False, "plain student with batch norm and a strided stem (the fastest on a CPU: "
                                           "one large window, no full-resolution stage)", "batch", "strided"),
    "recokd_bn_stem": _decade("recokd", 0.01, "ReCo-KD, student with batch norm and a strided stem",
                              student_norm="batch", student_stem="strided"),
    "ms_sard": _decade("ms_sard", 0.01, "MS-SARD only"),
    "ms_ca": _decade("ms_ca", 0.01, "MS-CA only"),
    "fitnet": _decade("fitnet", 1.0, "FitNet: adapter + MSE"),
    "cwd": _decade("cwd", 1.0, "channel-wise distillation"),
    "ifvd": _decade("ifvd", 1.0, "intra-class feature variation distillation"),
    "cirkd": _decade("cirkd", 0.1, "cross-image relational KD"),
}
#: what runs without --methods (the issue's default set; the others stay selectable)
DEFAULT_METHODS = ("none", "logit", "mskd", "recokd", "recokd_frozen_aux")

BRAIN_NETWORK = {
    "filters": [16, 32, 64, 128, 160],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 3]] * 5,
    "deep_supervision": True, "deep_supr_num": 2,
}
#: one training volume: more affine and intensity variation than the default (no flips: L/R labels)
BRAIN_AUGMENTATION = {"enabled": True, "rotate_deg": 15.0, "scale": [0.85, 1.2], "p_affine": 0.5, "flip_axes": [],
                      "p_noise": 0.15, "noise_std": 0.1, "p_brightness": 0.3, "brightness": 0.3, "p_gamma": 0.3,
                      "gamma": [0.7, 1.5]}


@dataclass(frozen=True)
class DatasetSetup:
    """One dataset of the benchmark: where it is, how it is preprocessed, the teacher's network."""

    key: str
    raw_name: str
    network: dict[str, Any]
    spacing: tuple[float, float, float]
    normalization: str
    patch_size: tuple[int, int, int]
    augmentation: dict[str, Any] | None = None  # None: the engine's default

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ct_network() -> dict[str, Any]:
    from ReCoKDLib.networks import preset

    return preset("ct_demo").to_dict()


def dataset_setups(patches: Mapping[str, Sequence[int]], spacings: Mapping[str, Sequence[float]]) -> dict[str, DatasetSetup]:
    return {
        "ct": DatasetSetup("ct", "Dataset901_CTAbdomenOrgans", _ct_network(), tuple(spacings["ct"]), "ct",
                           tuple(patches["ct"])),
        "brain": DatasetSetup("brain", "Dataset902_BrainSubcortical", BRAIN_NETWORK, tuple(spacings["brain"]),
                              "zscore", tuple(patches["brain"]), BRAIN_AUGMENTATION),
    }


@dataclass(frozen=True)
class Budget:
    """Step caps, validation, patches and settings shared by every run of one configuration.

    ``teacher_steps`` / ``student_steps`` are caps: a run stops earlier when its validation mean
    Dice has not improved for ``patience`` validations (one every ``val_every`` steps; students:
    ``student_patience`` every ``student_val_every``); the poly learning-rate schedule runs over the cap.
    """

    name: str
    teacher_steps: int
    student_steps: int
    patches: dict[str, tuple[int, int, int]]
    spacings: dict[str, tuple[float, float, float]]
    val_every: int = 100
    patience: int = 6
    student_val_every: int = 100
    student_patience: int = 5
    #: per dataset: (block, every): every ``every``-th block of ``block`` axial slices is validation
    val_blocks: dict[str, tuple[int, int]] = field(default_factory=lambda: {"ct": (8, 4), "brain": (4, 4)})
    batch_size: int = 2
    lr: float = 2e-3
    reduction: int = 4
    bf16: bool = True
    overlap: float = 0.25
    teacher_seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: 2 CPU cores (run with --workers 2: two runs side by side, one thread each). Students get 4,000
#: steps: at 2,000 the brain students' validation Dice was still rising (+0.04 median in the last
#: quarter) and the plain student's test Dice rose from 0.560 to 0.665 at 4,000
#: (budget experiment of commit d439183). Student patience 10 validations (1,000 steps):
#: with 5, a plain brain student stopped at step 2,300 while its noisy validation curve was still
#: rising (best 0.44 at 1,800; test 0.560 against 0.661 for the seed that ran 4,000 steps).
CPU = Budget("cpu", teacher_steps=6000, student_steps=4000, val_every=150, patience=6, student_patience=10,
             patches={"ct": (16, 64, 64), "brain": (32, 32, 32)},
             spacings={"ct": (3.0, 3.0, 3.0), "brain": (2.0, 2.0, 2.0)})
GPU = Budget("gpu", teacher_steps=12000, student_steps=6000, val_every=250, patience=8,
             patches={"ct": (16, 128, 128), "brain": (64, 64, 64)},
             spacings={"ct": (3.0, 3.0, 3.0), "brain": (1.5, 1.5, 1.5)}, batch_size=2, bf16=False, overlap=0.5)
SMOKE = Budget("smoke", teacher_steps=4, student_steps=2, val_every=2, patience=2, student_val_every=2,
               student_patience=2, val_blocks={"ct": (2, 2), "brain": (2, 2)},
               patches={"ct": (16, 32, 32), "brain": (32, 32, 32)},
               spacings={"ct": (6.0, 6.0, 6.0), "brain": (6.0, 6.0, 6.0)}, batch_size=1, overlap=0.0)
