"""``python -m ReCoKDLib`` is the ``recokd`` command (used by Slicer's PythonSlicer).

The Python version is checked before anything else is imported: on an older Python (Slicer 5.8
has 3.9) the library would fail deep inside an import; this says why instead (keep this file
importable by any Python 3).
"""

import json
import sys

MINIMUM_PYTHON = (3, 10)

if sys.version_info[:2] < MINIMUM_PYTHON:
    _message = ("recokd needs Python %d.%d or later (3D Slicer 5.10 or later); this is Python %d.%d"
                % (MINIMUM_PYTHON + tuple(sys.version_info[:2])))
    if "json" in sys.argv and "--progress" in sys.argv:  # a parent process reads JSON lines
        print(json.dumps({"v": 1, "event": "error", "stage": "start", "message": _message}), flush=True)
    sys.stderr.write(_message + "\n")
    raise SystemExit(2)

from ReCoKDLib.cli import main  # noqa: E402

raise SystemExit(main())
