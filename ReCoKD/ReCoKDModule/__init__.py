"""The ReCoKD Slicer module's code, one job per file (``ReCoKD/ReCoKD.py`` is only the shell
Slicer loads):

* :mod:`.versions`: which Slicer and Python the module supports (read first, on any Python);
* :mod:`.parameters`: the parameter node (what the panel saves with the scene);
* :mod:`.jobProgress`: a child job's state from its JSON-lines progress (pure Python);
* :mod:`.commandLines`: the ``python -m ReCoKDLib ...`` command lines and devices (pure Python);
* :mod:`.process`: child processes on ``qt.QProcess`` and the cancel sequence;
* :mod:`.requirements`: installing the Python packages on first use;
* :mod:`.modelChoices`: the models the Segment picker offers, the last used one remembered;
* :mod:`.logic`: everything the panel does, usable from the Python console;
* :mod:`.panel`: the panel (``Resources/UI/ReCoKD.ui``) bound to the parameter node;
* :mod:`.selfTest`: the in-Slicer self test, on data it builds itself (no network).

This file and :mod:`.versions` must run on any Python 3 (an old Slicer imports them before it is
told that it is too old); the others need the supported Slicer (Python 3.12).
"""
