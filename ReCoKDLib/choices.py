"""What a front end offers, readable without torch: the KD methods and the built-in teacher presets.

The 3D Slicer panel fills its lists from here before PyTorch is installed (the first time the
module opens, torch is usually missing), and the loss registry (:mod:`ReCoKDLib.losses.registry`)
and :mod:`ReCoKDLib.teacher_presets` read the same tables, so a name exists in one place only.

Example::

    >>> [m.name for m in KD_METHODS][:3]
    ['recokd', 'ms_sard', 'ms_ca']
    >>> kd_method("cirkd").title
    'CIRKD (cross-image relations)'
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

__all__ = ["KDMethod", "KD_METHODS", "kd_method", "builtin_teacher_presets", "TEACHER_PRESET_FOLDER"]


@dataclass(frozen=True)
class KDMethod:
    """One knowledge-distillation method.

    Attributes:
        name: the id the CLI (``--kd``), model cards and saved scenes use.
        implementation: ``"package.module:Class"`` of its loss (imported only when built).
        title: a short human-readable name for menus.
        description: one line on what it distils, with its reference.
    """

    name: str
    implementation: str
    title: str
    description: str


#: every method, in the order menus show them (ReCo-KD first: the default)
KD_METHODS: tuple[KDMethod, ...] = (
    KDMethod("recokd", "ReCoKDLib.losses.recokd:ReCoKDLoss", "ReCo-KD (regions + context)",
             "ReCo-KD: MS-SARD + MS-CA over encoder stages (Lan et al. 2026)"),
    KDMethod("ms_sard", "ReCoKDLib.losses.recokd:MSSARDLoss", "ReCo-KD regions only (MS-SARD)",
             "MS-SARD only: class-aware region masks with attention weighting"),
    KDMethod("ms_ca", "ReCoKDLib.losses.recokd:MSCALoss", "ReCo-KD context only (MS-CA)",
             "MS-CA only: 3D global-context (GcBlock) alignment"),
    KDMethod("mskd", "ReCoKDLib.losses.mskd:MSKDLoss", "MSKD (feature filtering + region graph)",
             "MSKD: feature filtering + region graph distillation (interpretation)"),
    KDMethod("ffd", "ReCoKDLib.losses.mskd:FeatureFilteringLoss", "MSKD feature filtering only",
             "MSKD's feature filtering distillation alone"),
    KDMethod("rgd", "ReCoKDLib.losses.mskd:RegionGraphLoss", "MSKD region graph only",
             "MSKD's region graph distillation alone"),
    KDMethod("logit", "ReCoKDLib.losses.baselines:LogitKDLoss", "Output probabilities (classic KD)",
             "temperature-scaled KL on logits (Hinton et al. 2015)"),
    KDMethod("fitnet", "ReCoKDLib.losses.baselines:FitNetLoss", "FitNet (feature regression)",
             "adapter + MSE on features (Romero et al. 2015)"),
    KDMethod("cwd", "ReCoKDLib.losses.baselines:CWDLoss", "Channel-wise distillation (CWD)",
             "channel-wise distillation (Shu et al. 2021)"),
    KDMethod("ifvd", "ReCoKDLib.losses.baselines:IFVDLoss", "Intra-class feature variation (IFVD)",
             "intra-class feature variation distillation (Wang et al. 2020)"),
    KDMethod("emkd", "ReCoKDLib.losses.baselines:EMKDLoss", "Efficient medical KD (EMKD)",
             "efficient medical KD: PMD + IMD + RAD (Qin et al. 2021)"),
    KDMethod("cirkd", "ReCoKDLib.losses.baselines:CIRKDLoss", "CIRKD (cross-image relations)",
             "cross-image relational KD with memory bank (Yang et al. 2022)"),
)


def kd_method(name: str) -> KDMethod:
    """The method called ``name``.

    Raises:
        KeyError: an unknown name; the message lists the known ones.
    """
    for method in KD_METHODS:
        if method.name == name:
            return method
    raise KeyError(f"unknown KD method {name!r}; known: {', '.join(m.name for m in KD_METHODS)}")


#: where the built-in teacher presets live, inside the ReCoKDLib package
TEACHER_PRESET_FOLDER = ("presets", "teachers")


def builtin_teacher_presets() -> list[str]:
    """Names of the built-in teacher presets (``ReCoKDLib/presets/teachers/<name>.json``), sorted."""
    folder = importlib.resources.files("ReCoKDLib").joinpath(*TEACHER_PRESET_FOLDER)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))
