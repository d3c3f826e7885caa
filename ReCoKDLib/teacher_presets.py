"""Teacher presets under their first name: the module is :mod:`ReCoKDLib.models.presets`."""

from ReCoKDLib.models.presets import *  # noqa: F401,F403
from ReCoKDLib.models.presets import __all__  # noqa: F401
