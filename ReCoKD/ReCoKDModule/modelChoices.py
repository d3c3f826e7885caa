"""The models the Segment picker offers, most recent first, remembered across Slicer sessions.

The list is kept in Slicer's settings (``qt.QSettings``, key :data:`RECENT_MODELS_KEY`) as one
JSON string: QSettings' INI format hands every value back as text (Slicer's own ``DICOM.py`` reads
``settings.value("DICOM/RunListenerAtStart") == "true"``), and a one-item list would come back as
a plain string, so a list is never stored as a QSettings list.
"""

import json
import pathlib

RECENT_MODELS_KEY = "ReCoKD/RecentModels"
MAX_RECENT_MODELS = 8
PRESET_PREFIX = "preset:"


class RecentModels:
    """Model sources (files, nnU-Net folders, ``preset:<name>``), the last used first.

    Args:
        settings: an object with ``value(key)`` / ``setValue(key, value)`` (default ``qt.QSettings()``).
    """

    def __init__(self, settings=None):
        if settings is None:
            import qt

            settings = qt.QSettings()
        self.settings = settings

    def sources(self) -> list:
        raw = self.settings.value(RECENT_MODELS_KEY)
        try:
            values = json.loads(raw) if raw else []
        except (TypeError, ValueError):
            return []
        return [str(v) for v in values if isinstance(v, str) and v.strip()] if isinstance(values, list) else []

    def remember(self, source) -> list:
        """Put ``source`` first; returns the new list."""
        source = str(source).strip()
        if not source:
            return self.sources()
        values = [source] + [s for s in self.sources() if s != source]
        values = values[:MAX_RECENT_MODELS]
        self.settings.setValue(RECENT_MODELS_KEY, json.dumps(values))
        return values

    def forget(self, source) -> list:
        values = [s for s in self.sources() if s != str(source)]
        self.settings.setValue(RECENT_MODELS_KEY, json.dumps(values))
        return values


def modelLabel(source) -> str:
    """Menu text of a model source: ``model_best.pt (ct_run)``, ``Dataset001 (nnU-Net)``, ``hd-bet (preset)``."""
    text = str(source)
    if text.startswith(PRESET_PREFIX):
        return f"{text[len(PRESET_PREFIX):]} (preset)"
    path = pathlib.Path(text)
    if path.is_dir():
        return f"{path.name} (nnU-Net folder)"
    return f"{path.name} ({path.parent.name})" if path.parent.name else path.name
