"""``recokd serve``: ReCoKD in the browser, on Slicer's own rendering (trame-slicer).

* :mod:`ReCoKDLib.web.catalogue` (no trame): the models the page offers, checked and titled from
  their model cards;
* :mod:`ReCoKDLib.web.uploads` (no trame): uploads (image files, DICOM series as files or a zip)
  staged for reading;
* :mod:`ReCoKDLib.web.app`: :class:`~ReCoKDLib.web.app.ServeApp`, the trame app, on the same
  :class:`~ReCoKDLib.mrml.logic.SceneLogic` as the Slicer module.

Needs the ``render`` extra (trame-slicer, slicer-core, vtk 9.6.0); the rest of ReCoKDLib does not.
"""
