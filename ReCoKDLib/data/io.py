"""Image I/O with exact geometry.

Conventions (the same as SimpleITK and 3D Slicer's ``arrayFromVolume``):

* numpy arrays are ``(D, H, W)`` = ``(z, y, x)`` = ``(k, j, i)``; multi-channel images are
  ``(C, D, H, W)``.
* :class:`Geometry` holds ``spacing``, ``origin`` and ``direction`` exactly as SimpleITK reports
  them: physical points in **LPS**, ``spacing``/``origin`` in ``(x, y, z)`` order and
  ``direction`` as the row-major 3x3 matrix whose columns are the i, j, k axes.
* Slicer's ``IJKToRAS`` matrix is ``diag(-1, -1, 1, 1) @ IJKToLPS``; :meth:`Geometry.ijk_to_ras`
  and :meth:`Geometry.from_ijk_to_ras` convert exactly.

Files: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``) through SimpleITK, and DICOM series (a folder) through ``SimpleITK.ImageSeriesReader``.
Every write goes to a temporary name in the target folder, is checked to hold all its voxel data
(:func:`~ReCoKDLib.data.image_files.incomplete_reason`: a full disk is caught even where ITK does
not report it) and flushed to disk, and is then renamed into place, so a crash or a full disk never
leaves half a file under the final name and a previous file is kept. Every read refuses a file
that holds less data than its header announces (ITK would fill the rest with zeros) and an image
with NaN/inf voxels (a network turns those into an all-background result) unless the caller asks
for them to be replaced (:func:`nonfinite_policy`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ReCoKDLib.checkpoint import OutputWriteError, atomic_output

__all__ = [
    "Geometry",
    "GeometryError",
    "ImageDimensionError",
    "ImageReadError",
    "TruncatedImageError",
    "NonFiniteVoxelsError",
    "InputWarning",
    "NonFiniteVoxelsWarning",
    "nonfinite_policy",
    "count_nonfinite",
    "check_finite",
    "LPS_TO_RAS",
    "IMAGE_SUFFIXES",
    "image_suffix",
    "dicom_series_files",
    "read_image",
    "read_header",
    "write_image",
    "to_sitk",
    "from_sitk",
    "same_grid",
    "check_same_grid",
    "grid_differences",
    "require_3d",
    "resample_to_grid",
    "crop",
]

#: file endings SimpleITK reads and writes here (longest first so ``.nii.gz`` wins over ``.gz``)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: RAS = LPS_TO_RAS @ LPS (homogeneous 4x4)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryError(ValueError):
    """Two images that must share a voxel grid do not, or a geometry is malformed."""


class ImageDimensionError(ValueError):
    """An image is not a 3D volume (it is 2D, or 4D where a single 3D volume was expected)."""


class ImageReadError(ValueError):
    """A file or folder could not be read as an image."""


class TruncatedImageError(ImageReadError):
    """An image file holds less voxel data than its header announces (an interrupted copy or a full disk)."""


class NonFiniteVoxelsError(ImageReadError):
    """An image holds NaN or infinite voxels (refused unless they are to be replaced)."""


class InputWarning(UserWarning):
    """Something about an input that works but deserves the user's eye (the CLI shows it as a warning event)."""


class NonFiniteVoxelsWarning(InputWarning):
    """NaN or infinite voxels were replaced on request."""


#: what :func:`read_image` does with NaN/inf voxels when not told: "error", "keep" or a number
_NONFINITE_POLICY: contextvars.ContextVar = contextvars.ContextVar("recokd_nonfinite_policy", default="error")


@contextlib.contextmanager
def nonfinite_policy(policy: str | float) -> Iterator[None]:
    """Within the block, :func:`read_image` treats NaN/inf voxels by ``policy``: ``"error"`` (the
    default: refuse with the count), ``"keep"``, ``"min"`` (replace by the smallest finite value)
    or a number to replace them with (each replacement is announced by a :class:`NonFiniteVoxelsWarning`)."""
    _parse_policy(policy)
    token = _NONFINITE_POLICY.set(policy)
    try:
        yield
    finally:
        _NONFINITE_POLICY.reset(token)


def _parse_policy(policy: str | float) -> str | float:
    if policy in ("error", "keep", "min"):
        return policy
    try:
        value = float(policy)
    except (TypeError, ValueError):
        raise ValueError(f"non-finite voxel policy must be 'error', 'keep', 'min' or a number; got {policy!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"non-finite voxels must be replaced by a finite number; got {policy!r}")
    return value


def count_nonfinite(array: np.ndarray) -> int:
    """Number of NaN/inf voxels of ``array`` (0 at once for integer arrays).

    One summing pass for float arrays (a NaN or inf makes the sum non-finite); the exact count
    only when that pass finds something.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return 0
    with np.errstate(all="ignore"):
        if np.isfinite(array.sum()):
            return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_finite(array: np.ndarray, name: str, policy: str | float | None = None) -> np.ndarray:
    """``array`` when all its voxels are finite; otherwise by ``policy`` (default: the current
    :func:`nonfinite_policy`): raise :class:`NonFiniteVoxelsError` with the count, keep them, or
    return a copy with them replaced (and warn with :class:`NonFiniteVoxelsWarning`)."""
    policy = _parse_policy(_NONFINITE_POLICY.get() if policy is None else policy)
    count = 0 if policy == "keep" else count_nonfinite(array)
    if count == 0:
        return array
    nan = int(np.count_nonzero(np.isnan(array)))
    what = f"{nan} NaN and {count - nan} infinite" if nan and count - nan else ("NaN" if nan else "infinite")
    what = what if nan and count - nan else f"{count} {what}"
    share = f"{100.0 * count / array.size:.3g}%"
    if policy == "error":
        raise NonFiniteVoxelsError(
            f"{name} has {what} voxel(s) ({share} of {array.size}); a network turns them into a wrong (all-background) "
            "segmentation. Fix the image, or replace them explicitly (recokd segment --replace-nonfinite VALUE, a "
            "number or 'min' for the smallest finite voxel)")
    finite = np.isfinite(array)
    value = float(array[finite].min()) if policy == "min" and finite.any() else (0.0 if policy == "min" else policy)
    warnings.warn(NonFiniteVoxelsWarning(f"{name}: replaced {what} voxel(s) ({share}) by {value:g}"), stacklevel=3)
    return np.where(finite, array, np.asarray(value, dtype=array.dtype))


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a 3D voxel grid (SimpleITK / LPS convention).

    Attributes:
        spacing: voxel size in mm along i, j, k (x, y, z order).
        origin: LPS position in mm of the centre of voxel (0, 0, 0).
        direction: row-major 3x3 direction cosines; column ``n`` is axis ``n`` (i, j, k) in LPS.
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in np.ravel(self.spacing))
        origin = tuple(float(s) for s in np.ravel(self.origin))
        direction = tuple(float(s) for s in np.ravel(self.direction))
        if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
            raise GeometryError(
                f"Geometry needs 3 spacings, 3 origin values and 9 direction values; got "
                f"{len(spacing)}, {len(origin)} and {len(direction)}"
            )
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise GeometryError(f"voxel spacing must be positive and finite; got {spacing}")
        if not all(np.isfinite(origin + direction)):
            raise GeometryError(f"origin and direction must be finite; got {origin}, {direction}")
        if abs(abs(np.linalg.det(np.reshape(direction, (3, 3)))) - 1.0) > 1e-3:
            raise GeometryError(f"direction must be an orthonormal 3x3 matrix; got {direction}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def direction_matrix(self) -> np.ndarray:
        """The 3x3 direction matrix (columns = i, j, k axes in LPS)."""
        return np.reshape(np.asarray(self.direction, dtype=float), (3, 3))

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping voxel indices (i, j, k, 1) to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to RAS millimetres (Slicer's ``IJKToRAS``)."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray | Sequence[Sequence[float]], shape: Sequence[int] | None = None) -> "Geometry":
        """Geometry from Slicer's 4x4 ``IJKToRAS`` matrix.

        Args:
            matrix: 4x4 (or 3x4) IJK -> RAS matrix, e.g. from ``volumeNode.GetIJKToRASMatrix``.
            shape: optional array shape ``(D, H, W)`` (``arrayFromVolume`` order) of the volume;
                checked to be 3D so a wrongly ordered or 2D array is caught here.
        """
        m = np.asarray(matrix, dtype=float)
        if m.shape not in ((4, 4), (3, 4)):
            raise GeometryError(f"IJKToRAS must be a 4x4 matrix; got shape {m.shape}")
        if shape is not None and len(tuple(shape)) != 3:
            raise ImageDimensionError(f"expected a 3D array shape (D, H, W); got {tuple(shape)}")
        lps = LPS_TO_RAS[:3, :3] @ m[:3, :]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        if np.any(spacing <= 0):
            raise GeometryError(f"IJKToRAS has a zero-length axis: {m.tolist()}")
        direction = lps[:, :3] / spacing
        return cls(tuple(spacing), tuple(lps[:, 3]), tuple(direction.ravel()))

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """LPS points of voxel indices; ``ijk`` is ``(N, 3)`` in (i, j, k) order."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ (self.direction_matrix @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) indices of LPS points ``(N, 3)``."""
        points = np.atleast_2d(np.asarray(points, dtype=float))
        inv = np.linalg.inv(self.direction_matrix @ np.diag(self.spacing))
        return (points - np.asarray(self.origin)) @ inv.T

    def orientation_code(self) -> str:
        """Three-letter code of the closest anatomical direction of +i, +j, +k (e.g. ``"LPS"``)."""
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        code = ""
        for axis in self.direction_matrix.T:
            n = int(np.argmax(np.abs(axis)))
            code += letters[n][0] if axis[n] > 0 else letters[n][1]
        return code

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        return cls(tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]))

    @classmethod
    def of(cls, image) -> "Geometry":
        """Geometry of a 3D ``SimpleITK.Image``."""
        if image.GetDimension() != 3:
            raise ImageDimensionError(f"expected a 3D SimpleITK image; got dimension {image.GetDimension()}")
        return cls(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


# --------------------------------------------------------------------------------------------
# Shape checks


def require_3d(array: np.ndarray, name: str = "image", allow_channels: bool = False) -> np.ndarray:
    """Return ``array`` if it is ``(D, H, W)`` (or ``(C, D, H, W)`` when ``allow_channels``).

    Raises:
        ImageDimensionError: naming ``name`` and the shape found, for 2D and other shapes.
    """
    ndim = np.ndim(array)
    if ndim == 3 or (allow_channels and ndim == 4):
        if min(np.shape(array)) < 1:
            raise ImageDimensionError(f"{name} has an empty axis: shape {np.shape(array)}")
        return array
    expected = "(D, H, W) or (C, D, H, W)" if allow_channels else "(D, H, W)"
    hint = " (a 2D image: ReCoKD segments 3D volumes)" if ndim == 2 else (
        " (a 4D/multi-channel image: pass one 3D volume per channel)" if ndim == 4 else "")
    raise ImageDimensionError(f"{name} must be a 3D volume {expected}; got shape {np.shape(array)}{hint}")


# --------------------------------------------------------------------------------------------
# SimpleITK conversion


def to_sitk(array: np.ndarray, geometry: Geometry):
    """numpy ``(D, H, W)`` or ``(C, D, H, W)`` + geometry -> ``SimpleITK.Image`` (channels as vector pixels)."""
    import SimpleITK as sitk

    array = np.asarray(array)
    require_3d(array, "array", allow_channels=True)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim == 4:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, 0, -1)), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def from_sitk(image) -> tuple[np.ndarray, Geometry]:
    """``SimpleITK.Image`` -> (array ``(D, H, W)`` or ``(C, D, H, W)``, geometry).

    A 4D scalar image (e.g. a 4D NIfTI) becomes ``(C, D, H, W)`` with the geometry of its
    first three axes; a 2D image raises :class:`ImageDimensionError`.
    """
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim == 4:
        size = list(image.GetSize())
        first = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
        geometry = Geometry.of(first)
        return sitk.GetArrayFromImage(image), geometry
    if dim != 3:
        raise ImageDimensionError(f"expected a 3D image; got a {dim}D image of size {image.GetSize()}")
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)
    return array, Geometry.of(image)


# --------------------------------------------------------------------------------------------
# Files


def image_suffix(path: str | os.PathLike) -> str:
    """The image file ending of ``path`` (``".nii.gz"``, ``".nrrd"``, ...); ``""`` if unknown."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def dicom_series_files(folder: str | os.PathLike) -> list[str]:
    """The files of the DICOM series in ``folder``, in the slice order of :func:`read_image`
    (GDCM's sort along the slice normal): file ``k`` is array slice ``k``. With several series in
    the folder, the one with most slices.

    Raises:
        ImageReadError: the folder holds no DICOM series.
    """
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageReadError(f"{folder} is a folder but holds no DICOM series; pass an image file or a DICOM folder")
    return list(max((reader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len))


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder))
    return reader.Execute()


def _itk_reason(exc: BaseException) -> str:
    """The line of an ITK exception text that says what went wrong (not its source location)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    telling = [line for line in lines if any(word in line.lower() for word in (
        "not read completely", "no space", "cannot", "could not", "unable", "error writing", "wrote only",
        "not a valid", "unknown", "unsupported", "fread", "expected"))
        and not line.startswith(("Exception thrown", "/"))]
    line = (telling or lines or [type(exc).__name__])[-1]
    return line[len("Reason:"):].strip() if line.startswith("Reason:") else line


def read_image(path: str | os.PathLike, allow_channels: bool = True, nonfinite: str | float | None = None
               ) -> tuple[np.ndarray, Geometry]:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder.

    Args:
        nonfinite: what to do with NaN/inf voxels: ``"error"``, ``"keep"``, ``"min"`` or a number to
            replace them with (default: the current :func:`nonfinite_policy`, ``"error"``).

    Returns:
        ``(array, geometry)``: array ``(D, H, W)`` (or ``(C, D, H, W)`` for multi-channel files
        when ``allow_channels``), in the file's own dtype and voxel order (no reorientation).

    Raises:
        ImageReadError: missing/unreadable path. TruncatedImageError: the file holds less voxel
        data than its header says. NonFiniteVoxelsError: NaN/inf voxels (policy ``"error"``).
        ImageDimensionError: 2D image, or channels when ``allow_channels`` is False.
    """
    import SimpleITK as sitk

    from ReCoKDLib.data.image_files import incomplete_reason

    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image not found: {path}")
    if path.is_file():
        reason = incomplete_reason(path)
        if reason:
            raise TruncatedImageError(
                f"{path} is incomplete: {reason}. It was cut short (an interrupted copy or download, or a full disk "
                "when it was written); copy or export it again")
    own = _read_float_nifti(path) if image_suffix(path) in (".nii.gz", ".nii") and nonfinite != "keep" else None
    if own is not None:
        array, geometry = own
    else:
        try:
            image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise ImageReadError(f"could not read {path} as an image: {_itk_reason(exc)}") from exc
        try:
            array, geometry = from_sitk(image)
        except ImageDimensionError as exc:
            raise ImageDimensionError(f"{path}: {exc}") from None
        if path.is_file() and np.issubdtype(array.dtype, np.floating) and nonfinite != "keep":
            array = _nifti_nonfinite_back(path, array)
    try:
        require_3d(array, str(path), allow_channels=allow_channels)
    except ImageDimensionError as exc:
        raise ImageDimensionError(f"{path}: {exc}") from None
    return check_finite(array, str(path), nonfinite), geometry


def read_header(path: str | os.PathLike):
    """A ``SimpleITK.ImageFileReader`` holding the header of the image file ``path`` (size, spacing,
    pixel type, metadata; no voxels are read), or ``None`` when ITK cannot read it."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _read_float_nifti(path: Path) -> tuple[np.ndarray, Geometry] | None:
    """A float NIfTI file's voxels read here in one pass (ITK would turn NaN/inf into 0 unseen) with
    ITK's geometry from the header; ``None`` when ITK must read it (see
    :func:`~ReCoKDLib.data.image_files.read_float_nifti`)."""
    import SimpleITK as sitk

    from ReCoKDLib.data.image_files import read_float_nifti

    array = read_float_nifti(path)
    if array is None:
        return None
    reader = read_header(path)
    if reader is None:
        return None  # ITK's own read says what is wrong
    size = tuple(reader.GetSize())
    pixel = {np.dtype(np.float32): sitk.sitkFloat32, np.dtype(np.float64): sitk.sitkFloat64}[array.dtype]
    if size != tuple(reversed(array.shape)) or reader.GetNumberOfComponents() != 1 or reader.GetPixelID() != pixel:
        return None
    n = len(size)
    direction = np.reshape(reader.GetDirection(), (n, n))[:3, :3]
    return array, Geometry(reader.GetSpacing()[:3], reader.GetOrigin()[:3], tuple(direction.ravel()))


def _nifti_nonfinite_back(path: Path, array: np.ndarray) -> np.ndarray:
    """ITK's NIfTI reader turns NaN/inf voxels into 0 silently: put them back from the file's bytes
    (:func:`~ReCoKDLib.data.image_files.nifti_nonfinite_voxels`) so they are counted and handled."""
    from ReCoKDLib.data.image_files import nifti_nonfinite_voxels

    raw = nifti_nonfinite_voxels(path)
    if raw is None:
        return array
    if raw.shape != array.shape:
        raise NonFiniteVoxelsError(f"{path} has {int(np.count_nonzero(~np.isfinite(raw)))} NaN or infinite voxel(s); "
                                   "a network turns them into a wrong segmentation. Fix the image")
    return np.where(np.isfinite(raw), array, raw.astype(array.dtype))


def _verify_written(path: Path, final: Path) -> None:
    """Raise :class:`OutputWriteError` unless the image file ``path`` (to become ``final``) holds all
    its data; then flush it to the disk."""
    from ReCoKDLib.data.image_files import incomplete_reason

    reason = incomplete_reason(path)
    if reason:
        raise OutputWriteError.of(final, OSError(28, f"the written file is incomplete ({reason}): the disk is "
                                                     "probably full"))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``array`` (``(D, H, W)`` or ``(C, D, H, W)``) with ``geometry`` to ``path`` atomically.

    The format follows the file ending (see :data:`IMAGE_SUFFIXES`). Integer and float dtypes are
    kept as they are (label maps stay integer); ``bool`` is written as ``uint8``. The written file is
    checked to hold all its voxel data and flushed before it replaces ``path``.

    Raises:
        OutputWriteError: the file could not be written completely (a full disk, no permission);
            ``path`` is left as it was (a previous file is kept) and no temporary file remains.
    """
    import SimpleITK as sitk

    path = Path(path)
    suffix = image_suffix(path)
    if not suffix or suffix in (".nhdr", ".mhd"):
        raise ImageReadError(
            f"cannot write {path}: use one of .nii.gz, .nii, .nrrd, .mha (single-file formats)")
    image = to_sitk(array, geometry)
    with atomic_output(path, suffix=f".tmp{suffix}", verify=lambda tmp: _verify_written(tmp, path)) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress and suffix != ".nii")
        except RuntimeError as exc:  # ITK's writers name no errno: a nearly full disk is taken as the cause
            import shutil

            full = "space" in str(exc).lower() or shutil.disk_usage(path.parent).free < np.asarray(array).nbytes
            raise OutputWriteError.of(path, OSError(28 if full else 5, _itk_reason(exc))) from None
    return path


# --------------------------------------------------------------------------------------------
# Grid comparison


def grid_differences(a: Geometry, b: Geometry, shape_a: Sequence[int], shape_b: Sequence[int], tol: float = 1e-4) -> list[str]:
    """Human-readable list of the fields in which two grids differ (empty when they match).

    ``shape_*`` are array shapes; only their last three axes ``(D, H, W)`` are compared, so a
    ``(C, D, H, W)`` image and its ``(D, H, W)`` label compare as expected. Spacing and origin are
    compared with relative/absolute tolerance ``tol`` (mm), directions with absolute ``tol``.
    """
    diffs = []
    sa, sb = tuple(shape_a)[-3:], tuple(shape_b)[-3:]
    if sa != sb:
        diffs.append(f"size (D, H, W) {sa} vs {sb}")
    if not np.allclose(a.spacing, b.spacing, rtol=tol, atol=tol):
        diffs.append(f"spacing {a.spacing} vs {b.spacing}")
    scale = max(1.0, float(np.max(np.abs(a.origin))))
    if not np.allclose(a.origin, b.origin, rtol=0, atol=tol * scale):
        diffs.append(f"origin {a.origin} vs {b.origin}")
    if not np.allclose(a.direction, b.direction, rtol=0, atol=tol):
        diffs.append(f"direction {a.direction} vs {b.direction}")
    return diffs


def same_grid(a: Geometry, b: Geometry, shape_a: Sequence[int], shape_b: Sequence[int], tol: float = 1e-4) -> bool:
    """True when both images sample the same voxel grid (size, spacing, origin, direction)."""
    return not grid_differences(a, b, shape_a, shape_b, tol)


def check_same_grid(
    a: Geometry,
    b: Geometry,
    shape_a: Sequence[int],
    shape_b: Sequence[int],
    name_a: str = "image",
    name_b: str = "label",
    tol: float = 1e-4,
) -> None:
    """Raise :class:`GeometryError` naming both images and every differing field."""
    diffs = grid_differences(a, b, shape_a, shape_b, tol)
    if diffs:
        raise GeometryError(
            f"{name_a} and {name_b} are not on the same voxel grid: " + "; ".join(diffs)
            + ". Resample the label onto the image grid (nearest neighbour) before using them together."
        )


def resample_to_grid(
    array: np.ndarray,
    geometry: Geometry,
    ref_geometry: Geometry,
    ref_shape: Sequence[int],
    interpolation: str = "nearest",
    default_value: float = 0.0,
) -> np.ndarray:
    """Resample a ``(D, H, W)`` array onto another grid through world coordinates (identity transform).

    Args:
        interpolation: ``"nearest"`` (label maps; dtype kept) or ``"linear"`` (images; float32).
        ref_shape: target ``(D, H, W)``.
    """
    import SimpleITK as sitk

    require_3d(array, "array to resample")
    interp = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}.get(interpolation)
    if interp is None:
        raise ValueError(f"interpolation must be 'nearest' or 'linear'; got {interpolation!r}")
    source = to_sitk(array if interpolation == "nearest" else np.asarray(array, np.float32), geometry)
    reference = sitk.Image([int(s) for s in reversed(tuple(ref_shape)[-3:])], source.GetPixelID())
    reference.SetSpacing(ref_geometry.spacing)
    reference.SetOrigin(ref_geometry.origin)
    reference.SetDirection(ref_geometry.direction)
    out = sitk.Resample(source, reference, sitk.Transform(), interp, default_value, source.GetPixelID())
    return sitk.GetArrayFromImage(out)


def crop(array: np.ndarray, geometry: Geometry, start: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, Geometry]:
    """Cut the box ``start : start + size`` (both ``(D, H, W)``) out of ``(D, H, W)`` or
    ``(C, D, H, W)`` ``array``; the returned geometry places the crop exactly where it was."""
    require_3d(array, "array to crop", allow_channels=True)
    shape = np.shape(array)[-3:]
    start, size = [int(s) for s in start], [int(s) for s in size]
    if len(start) != 3 or len(size) != 3 or any(s < 0 for s in start) or any(n < 1 for n in size) or any(
            s + n > d for s, n, d in zip(start, size, shape)):
        raise ValueError(f"crop box start {start} size {size} does not fit in shape (D, H, W) {tuple(shape)}")
    box = tuple(slice(s, s + n) for s, n in zip(start, size))
    origin = geometry.index_to_physical(np.asarray(start[::-1], dtype=float))[0]
    return array[(Ellipsis, *box)], Geometry(geometry.spacing, tuple(origin), geometry.direction)
