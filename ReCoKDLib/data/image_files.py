"""Is an image file complete? The voxel data its header announces, checked without reading it.

ITK reads a NIfTI file (``.nii`` and ``.nii.gz``) that was cut short as zeros past the end, and
its NIfTI, NRRD and MetaImage writers do not all report a full disk (measured with SimpleITK
2.x: ``.nii``, ``.nii.gz``, gzip ``.nrrd`` and compressed ``.mha`` come out truncated without an
exception). :func:`incomplete_reason` compares what a file holds with what its header says, in
constant time for the normal case:

==============  ===================================================================================
``.nii``        file size >= ``vox_offset`` + voxels x ``bitpix`` / 8 (NIfTI-1 and NIfTI-2 headers)
``.nii.gz``     the gzip trailer's ``ISIZE`` (uncompressed size mod 2**32) = ``vox_offset`` + data
``.nrrd``       attached data: raw -> header + data bytes; gzip -> the trailer's ``ISIZE`` = data
``.mha``        ``ElementDataFile = LOCAL``: header + ``CompressedDataSize`` (compressed) or + data
==============  ===================================================================================

ITK's NIfTI reader also turns NaN/inf voxels of float files into 0 without a word:
:func:`nifti_nonfinite_voxels` finds them in the file's own bytes.

When a gzip trailer does not match (a file written as several gzip members, or one larger than
4 GiB written oddly), the stream is decompressed to be sure: a complete file passes, a truncated
one fails. Detached headers (``.nhdr``, ``.mhd``), other encodings and DICOM are not checked
here (ITK reports those itself).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["incomplete_reason", "nifti_nonfinite_voxels", "read_float_nifti"]

#: bytes per voxel component of NRRD ``type:`` / MetaImage ``ElementType`` names
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _size_text(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _gzip_payload(path: Path, start: int) -> int | None:
    """Uncompressed size of the gzip member(s) from byte ``start`` (decompressing them), or
    ``None`` when the stream stops before its end marker or is damaged. Zero padding after the
    last member is allowed."""
    total, inflater = 0, zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as fh:
        fh.seek(start)
        for block in iter(lambda: fh.read(1 << 20), b""):
            while block:
                if inflater is None:
                    if not block.strip(b"\0"):
                        break  # padding after the last member
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                try:
                    total += len(inflater.decompress(block))
                except zlib.error:
                    return None
                block, inflater = (inflater.unused_data, None) if inflater.eof else (b"", inflater)
    return total if inflater is None else None


def _gzip_reason(path: Path, start: int, expected: int, what: str) -> str:
    """Why the gzip stream from ``start`` does not decompress to ``expected`` bytes ('' if it does)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        if end - start < 18:
            return f"its compressed {what} is missing ({end} bytes in all)"
        fh.seek(end - 4)
        (isize,) = struct.unpack("<I", fh.read(4))
    if isize == expected % 2**32:
        return ""
    actual = _gzip_payload(path, start)
    if actual is not None and actual >= expected:
        return ""
    if actual is None:
        return f"its compressed {what} stops before the end of the stream (the file is cut short)"
    return f"its {what} holds {_size_text(actual)} where the header announces {_size_text(expected)}"


@dataclass(frozen=True)
class _NiftiHeader:
    endian: str
    sizeof_hdr: int
    dims: tuple[int, ...]  # (nx, ny, nz, nt, ...) of the used axes
    datatype: int
    bitpix: int
    offset: int
    scale: tuple[float, float] = (1.0, 0.0)  # scl_slope, scl_inter

    @property
    def voxels(self) -> int:
        n = 1
        for d in self.dims:
            n *= max(int(d), 1)
        return n

    @property
    def data_start(self) -> int:
        return max(self.offset, self.sizeof_hdr)

    @property
    def float_dtype(self) -> np.dtype | None:
        """The numpy type of float voxel data (float32, float64), ``None`` for other types."""
        kind = {16: "f4", 64: "f8"}.get(self.datatype)
        return np.dtype(self.endian + kind) if kind else None


_NIFTI_MAGIC = (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")


def _nifti_header(head: bytes) -> _NiftiHeader | None:
    """The fields of a NIfTI-1/-2 header (``None``: not one, or malformed; ITK says what it is)."""
    if len(head) < 348 or head[:4] not in _NIFTI_MAGIC:
        return None
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            scale = struct.unpack(endian + "2f", head[112:120])
            break
        if sizeof_hdr == 540 and len(head) >= 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            scale = struct.unpack(endian + "2d", head[176:192])
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1:ndim + 1]):
        return None
    return _NiftiHeader(endian, sizeof_hdr, tuple(int(d) for d in dims[1:ndim + 1]), int(datatype), int(bitpix),
                        int(offset), (float(scale[0]), float(scale[1])))


def _read_nifti_head(path: Path, compressed: bool) -> bytes:
    with (gzip.open if compressed else open)(path, "rb") as fh:
        return fh.read(540)


def _nifti_reason(path: Path, compressed: bool) -> str:
    try:
        head = _read_nifti_head(path, compressed)
    except EOFError:
        return "its compressed header stops before the end of the stream (the file is cut short)"
    except (OSError, zlib.error):
        return ""  # not gzip data: ITK says what it is
    if 4 <= len(head) < 348 and head[:4] in _NIFTI_MAGIC:
        return f"it holds {len(head)} bytes, less than its NIfTI header (348)"
    header = _nifti_header(head)
    if header is None:
        return ""
    expected = header.data_start + header.voxels * header.bitpix // 8
    if compressed:
        return _gzip_reason(path, 0, expected, "data")
    size = path.stat().st_size
    if size < expected:
        return f"it holds {_size_text(size)} where its header announces {_size_text(expected)}"
    return ""


def _nifti_chunks(path: Path, header: _NiftiHeader, compressed: bool, size: int = 1 << 24):
    """The voxel data of a NIfTI file in blocks of whole voxels."""
    width = header.bitpix // 8
    total = header.voxels * width
    with (gzip.open if compressed else open)(path, "rb") as fh:
        fh.seek(header.data_start)
        while total > 0:
            block = fh.read(min(size - size % width, total))
            if not block:
                return
            total -= len(block)
            yield block


def read_float_nifti(path: str | os.PathLike) -> np.ndarray | None:
    """The voxels of a float NIfTI file in one pass, ``(D, H, W)`` or ``(T, D, H, W)`` in native byte
    order, NaN/inf kept; ``None`` where ITK would change the values (``scl_slope`` / ``scl_inter``
    scaling), for other voxel types, or other than 3 or 4 axes (then read with ITK).

    ITK's NIfTI reader turns NaN/inf voxels into 0; reading float files here sees them at the cost
    of one read (:func:`nifti_nonfinite_voxels` would be a second one).
    """
    path = Path(path)
    compressed = path.name.lower().endswith(".nii.gz")
    try:
        header = _nifti_header(_read_nifti_head(path, compressed))
    except (OSError, EOFError, zlib.error):
        return None
    if header is None or header.float_dtype is None or header.scale[0] not in (0.0, 1.0) or header.scale[1] != 0.0:
        return None
    dims = list(header.dims)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) not in (3, 4):
        return None
    data = np.empty(header.voxels, header.float_dtype)
    with (gzip.open if compressed else open)(path, "rb") as fh:
        fh.seek(header.data_start)
        if fh.readinto(memoryview(data).cast("B")) != data.nbytes:  # decompressed straight into the array
            return None
    return data.reshape(tuple(reversed(dims))).astype(header.float_dtype.newbyteorder("="), copy=False)


def nifti_nonfinite_voxels(path: str | os.PathLike) -> np.ndarray | None:
    """The voxels of a float NIfTI file as stored, ``(..., D, H, W)``, when some are NaN/inf;
    ``None`` when none is (or the file is not a float NIfTI file).

    ITK's NIfTI reader (niftilib) silently turns such voxels into 0, so they are looked for in the
    file's own bytes: one summing pass over the voxel data (float files only; integer files, as
    most CT, cost nothing), the mask only when that pass finds something.
    """
    path = Path(path)
    name = path.name.lower()
    compressed = name.endswith(".nii.gz")
    if not (compressed or name.endswith(".nii")):
        return None
    try:
        header = _nifti_header(_read_nifti_head(path, compressed))
    except (OSError, EOFError, zlib.error):
        return None
    dtype = header.float_dtype if header is not None else None
    if dtype is None:
        return None
    with np.errstate(all="ignore"):
        if all(np.isfinite(np.frombuffer(block, dtype).sum()) for block in _nifti_chunks(path, header, compressed)):
            return None
    data = np.frombuffer(b"".join(_nifti_chunks(path, header, compressed)), dtype)
    if data.size != header.voxels:
        return None
    return data.reshape(tuple(reversed(header.dims)))


def _head(path: Path, limit: int = 1 << 16) -> bytes:
    """The first ``limit`` bytes: the text header of an NRRD/MetaImage file and some data."""
    with open(path, "rb") as fh:
        return fh.read(limit)


def _count(values: str) -> int:
    total = 1
    for v in values.split():
        total *= int(float(v))
    return total


def _nrrd_reason(path: Path) -> str:
    head = _head(path)
    end = head.find(b"\n\n")
    if end < 0:
        return ""  # no data after the header within 64 KiB (a detached header): not checked here
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    if "data file" in fields or "datafile" in fields or "line skip" in fields or "byte skip" in fields:
        return ""  # detached or skipped data: not checked here
    try:
        voxels = _count(fields["sizes"])
        width = _NRRD_TYPES[fields["type"].lower()]
    except (KeyError, ValueError):
        return ""
    start, expected = end + 2, voxels * width
    encoding = fields.get("encoding", "raw").lower()
    if encoding == "raw":
        size = path.stat().st_size
        if size - start < expected:
            return f"it holds {_size_text(max(size - start, 0))} of data where its header announces {_size_text(expected)}"
        return ""
    if encoding in ("gzip", "gz"):
        return _gzip_reason(path, start, expected, "data")
    return ""


def _mha_reason(path: Path) -> str:
    head = _head(path)
    match = re.search(rb"ElementDataFile\s*=\s*(\S+)[ \t]*\r?\n", head)
    if match is None or match.group(1) != b"LOCAL":
        return ""  # detached data or no header end within 64 KiB
    start = match.end()
    fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition("=") for line in
                                                           head[:match.start()].decode("latin-1").splitlines()))
    size = path.stat().st_size
    try:
        if fields.get("CompressedData", "False").lower() == "true":
            expected = int(fields["CompressedDataSize"])
        else:
            expected = _count(fields["DimSize"]) * _MET_TYPES[fields["ElementType"]] * int(
                fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        return ""
    if size - start < expected:
        return f"it holds {_size_text(max(size - start, 0))} of data where its header announces {_size_text(expected)}"
    return ""


def incomplete_reason(path: str | os.PathLike) -> str:
    """Why the image file ``path`` holds less voxel data than its header announces, or ``""``.

    Reads the header and, for gzip data, the last 4 bytes (the whole stream only when those
    disagree); see the module docstring for what is checked per format.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            return _nifti_reason(path, compressed=True)
        if name.endswith(".nii"):
            return _nifti_reason(path, compressed=False)
        if name.endswith(".nrrd"):
            return _nrrd_reason(path)
        if name.endswith(".mha"):
            return _mha_reason(path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return ""
