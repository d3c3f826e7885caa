"""``python -m ReCoKDLib`` is the ``recokd`` command (used by Slicer's PythonSlicer)."""

from ReCoKDLib.cli import main

raise SystemExit(main())
