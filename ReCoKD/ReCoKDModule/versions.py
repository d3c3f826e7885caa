"""Which 3D Slicer and Python the module supports, checked before anything else is imported.

Slicer 5.10 and later ship Python 3.12; Slicer 5.8 shipped Python 3.9, on which ``ReCoKDLib``
(written for Python >= 3.10, e.g. ``Projection = tuple[Tensor, Tensor | None] | None`` evaluated
at import in ``losses/recokd.py``) fails deep inside an import or a child process. The module
file calls :func:`unsupportedMessage` first and, on an older Slicer, shows that message instead
of the panel; ``python -m ReCoKDLib`` checks the Python version the same way.

Keep this file importable by any Python 3: no ``X | Y`` types, no ``match``, no walrus.
"""

#: oldest supported Slicer (major, minor)
MINIMUM_SLICER = (5, 10)
#: oldest Python ReCoKDLib runs on (Slicer 5.10 has 3.12)
MINIMUM_PYTHON = (3, 10)


def unsupportedMessage(slicerMajor, slicerMinor, pythonVersion):
    """A message for the user when this Slicer or Python is too old, else ``None``.

    Args:
        slicerMajor, slicerMinor: ``slicer.app.majorVersion``, ``slicer.app.minorVersion``.
        pythonVersion: ``sys.version_info`` (or a tuple ``(major, minor, ...)``).
    """
    slicerVersion = (int(slicerMajor), int(slicerMinor))
    python = tuple(int(v) for v in tuple(pythonVersion)[:2])
    problems = []
    if slicerVersion < MINIMUM_SLICER:
        problems.append("this is 3D Slicer %d.%d" % slicerVersion)
    if python < MINIMUM_PYTHON:
        problems.append("its Python is %d.%d" % python)
    if not problems:
        return None
    return ("ReCoKD needs 3D Slicer %d.%d or later (Python %d.%d or later); " % (MINIMUM_SLICER + MINIMUM_PYTHON)
            + " and ".join(problems) + ". Install the current Slicer release from "
            "https://download.slicer.org and install ReCoKD there.")
