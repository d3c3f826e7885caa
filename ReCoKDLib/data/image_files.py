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
from pathlib import Path

__all__ = ["incomplete_reason"]

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


def _nifti_reason(path: Path, compressed: bool) -> str:
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(540)
    except EOFError:
        return "its compressed header stops before the end of the stream (the file is cut short)"
    except (OSError, zlib.error):
        return ""  # not gzip data: ITK says what it is
    if len(head) < 4 or head[:4] not in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00",
                                         b"\x00\x00\x02\x1c"):
        return ""  # not a NIfTI header (sizeof_hdr 348 or 540): ITK says what it is
    if len(head) < 348:
        return f"it holds {len(head)} bytes, less than its NIfTI header (348)"
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if sizeof_hdr == 540 and len(head) >= 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return ""  # not a NIfTI header: ITK will say so
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1:ndim + 1]):
        return ""  # a malformed header: ITK reports it
    voxels = 1
    for d in dims[1:ndim + 1]:
        voxels *= max(int(d), 1)
    expected = max(offset, sizeof_hdr) + voxels * bitpix // 8
    if compressed:
        return _gzip_reason(path, 0, expected, "data")
    size = path.stat().st_size
    if size < expected:
        return f"it holds {_size_text(size)} where its header announces {_size_text(expected)}"
    return ""


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
