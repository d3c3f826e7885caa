"""Which voxels to compute: a Markups ROI as array slices, and the geometry of a crop (pure)."""

from slicer.i18n import tr as _

from ReCoKDModule.commandLines import ReCoKDInputError


def roiVoxelBox(rasBounds, ijkToRas, shape) -> tuple:
    """Array slices ``(k, j, i)`` of the voxels inside a world box.

    Args:
        rasBounds: ``(xmin, xmax, ymin, ymax, zmin, zmax)`` in RAS mm (``roiNode.GetRASBounds``).
        ijkToRas: the volume's 4x4 IJK-to-RAS matrix.
        shape: array shape ``(D, H, W)``.

    Raises:
        ReCoKDInputError: the box does not overlap the volume.
    """
    import numpy as np

    x0, x1, y0, y1, z0, z1 = (float(b) for b in rasBounds)
    corners = np.array([[x, y, z, 1.0] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])
    ijk = (np.linalg.inv(np.asarray(ijkToRas, dtype=float)) @ corners.T)[:3].T
    low = np.maximum(np.floor(ijk.min(axis=0) + 0.5), 0).astype(int)  # voxel centres inside
    high = np.minimum(np.ceil(ijk.max(axis=0) - 0.5) + 1, np.asarray(shape)[::-1]).astype(int)
    if np.any(high <= low):
        raise ReCoKDInputError(_("The ROI does not overlap the input volume; move or resize it."))
    return tuple(slice(int(low[a]), int(high[a])) for a in (2, 1, 0))


def fullBox(shape) -> tuple:
    return tuple(slice(0, int(n)) for n in shape[-3:])


def cropGeometry(geometry, box):
    """Geometry of ``array[box]`` (``box`` = slices ``(k, j, i)``): same spacing and direction,
    origin at the first kept voxel."""
    from ReCoKDLib.data.io import Geometry

    start = [box[2].start or 0, box[1].start or 0, box[0].start or 0]
    origin = geometry.index_to_physical([start])[0]
    return Geometry(geometry.spacing, tuple(origin), geometry.direction)


def selectMapKey(keys, level: int, mapChoice: str, className: str = "") -> str:
    """Pick the map for the panel's choices among ``ReCoKDLib.inspection.compute_maps`` keys
    (``"<level>/<name>[/<class>]"``); the rule is the library's (``inspection.select_map_key``).

    Raises:
        ReCoKDInputError: nothing matches; the message lists what is available at that level.
    """
    from ReCoKDLib.inspection import InspectionError, select_map_key

    try:
        return select_map_key(keys, level, mapChoice, className)
    except InspectionError as exc:
        raise ReCoKDInputError(str(exc)) from None
