"""What the browser uploads, turned into something :func:`ReCoKDLib.data.io.read_image` reads.

Pure Python (no trame): :func:`stage_upload` takes the uploaded files (name and bytes) and writes
them into a folder of the server, returning the path to read:

* one NIfTI / NRRD / MHA file: that file;
* a ``.zip`` (a DICOM series as a clinic exports it, or an image file zipped): extracted safely
  (no absolute paths, no ``..``, size and count limits), then the folder holding the most DICOM
  files, or the one image file inside;
* several files (the slices of a series, picked together or as a folder): a DICOM folder;
* one DICOM slice alone: refused (a volume needs the whole series).
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from ReCoKDLib.data.io import IMAGE_SUFFIXES, image_suffix

__all__ = ["UploadError", "stage_upload", "is_dicom_bytes", "MAX_UPLOAD_BYTES", "MAX_ZIP_MEMBERS"]

#: largest total of extracted bytes accepted from one upload (a large CT series is ~0.5 GB)
MAX_UPLOAD_BYTES = 4 << 30
#: most files accepted in one zip
MAX_ZIP_MEMBERS = 20000


class UploadError(ValueError):
    """An upload that is not an image, a zipped image or a DICOM series; the message says what to upload."""


def is_dicom_bytes(data: bytes) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _safe_member(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or name.endswith("/"):
        return None
    if any(part.startswith("__MACOSX") or part.startswith(".") for part in path.parts):
        return None  # macOS resource forks and hidden files are not slices
    return path


def _extract_zip(data_path: Path, folder: Path, shown_name: str) -> Path:
    try:
        archive = zipfile.ZipFile(data_path)
    except zipfile.BadZipFile:
        raise UploadError(f"{shown_name} is not a readable zip archive") from None
    with archive:
        members = [(info, _safe_member(info.filename)) for info in archive.infolist()]
        members = [(info, path) for info, path in members if path is not None]
        if len(members) > MAX_ZIP_MEMBERS:
            raise UploadError(f"{shown_name} holds {len(members)} files; at most {MAX_ZIP_MEMBERS} are accepted")
        if sum(info.file_size for info, _ in members) > MAX_UPLOAD_BYTES:
            raise UploadError(f"{shown_name} unpacks to more than {MAX_UPLOAD_BYTES >> 30} GiB")
        dicom_folders: dict[Path, int] = {}
        images: list[Path] = []
        for info, member in members:
            target = folder.joinpath(*member.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source:
                data = source.read()
            target.write_bytes(data)
            if is_dicom_bytes(data[:132]):
                dicom_folders[target.parent] = dicom_folders.get(target.parent, 0) + 1
            elif image_suffix(target) in IMAGE_SUFFIXES:
                images.append(target)
    if dicom_folders:
        return max(dicom_folders, key=dicom_folders.get)
    if len(images) == 1:
        return images[0]
    if images:
        raise UploadError(f"{shown_name} holds {len(images)} image files ({', '.join(p.name for p in images[:3])}"
                          f"{', ...' if len(images) > 3 else ''}); zip one volume at a time")
    raise UploadError(f"{shown_name} holds no DICOM file and no NIfTI, NRRD or MHA image")


def stage_upload(files: Sequence[tuple[str, bytes]], folder: str | Path) -> Path:
    """Write uploaded ``(name, content)`` pairs under ``folder``; return the path to read.

    Raises:
        UploadError: nothing uploaded, an unknown kind of file, a lone DICOM slice, a zip without
            an image (the message names the file and says what to upload instead).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [(Path(str(name or "upload")).name, bytes(content or b"")) for name, content in files]
    files = [(name, content) for name, content in files if content]
    if not files:
        raise UploadError("the upload is empty")
    if len(files) == 1:
        name, content = files[0]
        if name.lower().endswith(".zip"):
            archive = folder / "upload.zip"
            archive.write_bytes(content)
            return _extract_zip(archive, folder / "unzipped", name)
        suffix = image_suffix(name)
        if suffix in IMAGE_SUFFIXES:
            path = folder / f"upload{suffix}"
            path.write_bytes(content)
            return path
        if is_dicom_bytes(content):
            raise UploadError(f"{name} is a single DICOM slice; upload the whole series (all its files at once, "
                              "or the series folder as a .zip)")
        raise UploadError(f"cannot load {name}: upload a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MHA (.mha) file, "
                          "or a DICOM series (its files, or a .zip)")
    series = folder / "series"
    series.mkdir(exist_ok=True)
    not_dicom = [name for name, content in files if not is_dicom_bytes(content)]
    if not_dicom:
        raise UploadError(f"several files were uploaded, so they should be the slices of one DICOM series, but "
                          f"{', '.join(not_dicom[:3])}{', ...' if len(not_dicom) > 3 else ''} "
                          f"{'is' if len(not_dicom) == 1 else 'are'} not DICOM; upload one image file, or a series")
    for index, (name, content) in enumerate(files):
        (series / f"{index:05d}_{name}").write_bytes(content)
    return series
