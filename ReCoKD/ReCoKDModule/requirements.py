"""The Python packages ReCoKD installs into Slicer's Python on first use, after one confirmation.

torch comes from the PyTorch extension's ``PyTorchUtils`` (the build matching the GPU's CUDA);
the rest from ``Resources/requirements.txt`` with ``slicer.packaging.pip_ensure`` (Slicer >= 5.12)
or ``slicer.util.pip_install`` (5.10). SimpleITK, numpy, requests and vtk are Slicer's and are
never installed or replaced.
"""

import importlib
import importlib.util
import pathlib
import re

import slicer
from slicer.i18n import tr as _

from ReCoKDModule.commandLines import ReCoKDInputError

#: packages Slicer ships; pip must never replace them
SLICER_OWNED_PACKAGES = ("SimpleITK", "numpy", "requests", "vtk")
REQUIREMENTS_FILE = pathlib.Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def requirementName(requirement: str) -> str:
    """``"monai>=1.3,<1.7"`` -> ``"monai"``."""
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)


def requirements(path=REQUIREMENTS_FILE) -> list:
    """Requirement lines of ``Resources/requirements.txt`` (never Slicer's own packages)."""
    lines = [line.split("#")[0].strip() for line in pathlib.Path(path).read_text().splitlines()]
    return [line for line in lines if line]


def missingModules(path=REQUIREMENTS_FILE) -> list:
    """torch and the requirement names that are not importable yet (found without importing them)."""
    names = ["torch"] + [requirementName(r) for r in requirements(path)]
    return [name for name in names if importlib.util.find_spec(name.lower().replace("-", "_")) is None]


def setupPythonRequirements(confirm=True, path=REQUIREMENTS_FILE) -> bool:
    """Install what is missing, after one confirmation listing it; returns True when ready."""
    missing = missingModules(path)
    if not missing:
        return True
    owned = {p.lower() for p in SLICER_OWNED_PACKAGES}
    others = [r for r in requirements(path) if requirementName(r) in missing and requirementName(r).lower() not in owned]
    listing = "\n".join(["torch (" + _("through the PyTorch extension") + ")"] * ("torch" in missing) + others)
    size = _("several minutes; torch is 1-3 GB") if "torch" in missing else _("a minute or two")
    if confirm and not slicer.util.confirmOkCancelDisplay(
            _("ReCoKD needs these Python packages, which will be downloaded and installed now ({size}):").format(
                size=size) + "\n\n" + listing):
        return False
    if "torch" in missing:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise ReCoKDInputError(_("Install the PyTorch extension from the Extensions Manager and restart Slicer; "
                                     "it installs the torch build that matches your GPU.")) from exc
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.1") is None:
            raise ReCoKDInputError(_("PyTorch could not be installed; see the Python console for details."))
    packaging = getattr(slicer, "packaging", None)
    if others and packaging is not None and hasattr(packaging, "pip_ensure"):
        from packaging.requirements import Requirement  # the PyPA library, shipped with Slicer's pip

        packaging.pip_ensure([Requirement(r) for r in others], skip_packages=list(SLICER_OWNED_PACKAGES),
                             prompt_install=False, requester="ReCoKD")  # already confirmed above
    elif others:
        slicer.util.pip_install(others)
    importlib.invalidate_caches()
    return not missingModules(path)
