"""Knowledge-distillation losses: ReCo-KD (MS-SARD + MS-CA), MSKD (FFD + RGD) and baselines.

Build any of them by name with :func:`ReCoKDLib.losses.registry.build_kd_loss`; the contract they
share is in :mod:`ReCoKDLib.losses.base`.
"""

from ReCoKDLib.losses.base import KDBatch, KDConfigError, KDOutput

__all__ = ["KDBatch", "KDConfigError", "KDOutput"]
