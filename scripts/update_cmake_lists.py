#!/usr/bin/env python3
"""Rewrite (or check) the file lists in the extension's CMakeLists.txt files.

``slicerMacroBuildScriptedModule`` installs only the files it is given: a ``.py`` file or a
resource missing from the lists works from a source checkout and silently disappears from the
installed extension. The lists between ``# BEGIN <VAR>`` and ``# END <VAR>`` are therefore
generated from the folders:

* ``ReCoKD/CMakeLists.txt``: ``MODULE_PYTHON_SCRIPTS`` = the module's ``.py`` files (outside
  ``Resources/``); ``MODULE_PYTHON_RESOURCES`` = every file under ``ReCoKD/Resources/``.
* ``ReCoKDLib/CMakeLists.txt``: ``MODULE_PYTHON_SCRIPTS`` = every ``.py`` file under
  ``ReCoKDLib/``; ``MODULE_PYTHON_RESOURCES`` = its other package files (JSON presets, ...).

Usage::

    python scripts/update_cmake_lists.py          # rewrite the lists in place
    python scripts/update_cmake_lists.py --check  # exit 1 and print the differences if stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: folder -> how its files are split into the two lists
MODULE_DIRS = ("ReCoKD", "ReCoKDLib")
IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints"}
IGNORED_SUFFIXES = {".pyc", ".pyo", ".orig", ".rej", ".swp", ".tmp"}
IGNORED_NAMES = {"CMakeLists.txt", ".DS_Store", "STOP"}

_BLOCK = re.compile(r"(?P<head>[ \t]*# BEGIN (?P<var>\w+)[^\n]*\n)(?P<body>.*?)(?P<tail>[ \t]*# END (?P=var)[^\n]*\n)", re.S)


class CMakeListsError(ValueError):
    """A CMakeLists.txt lacks the BEGIN/END markers this script maintains."""


def _files(folder: Path) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (not path.is_file() or IGNORED_PARTS & set(rel.parts) or path.suffix in IGNORED_SUFFIXES
                or path.name in IGNORED_NAMES or path.name.startswith(".")):
            continue
        out.append(rel)
    return out


def expected_lists(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """``{"ReCoKD": {"MODULE_PYTHON_SCRIPTS": [...], "MODULE_PYTHON_RESOURCES": [...]}, "ReCoKDLib": {...}}``,
    paths relative to each module folder, POSIX separators, sorted."""
    lists = {}
    for name in MODULE_DIRS:
        files = _files(root / name)
        if name == "ReCoKD":
            scripts = [f for f in files if f.suffix == ".py" and f.parts[0] != "Resources"]
            resources = [f for f in files if f.parts[0] == "Resources"]
        else:
            scripts = [f for f in files if f.suffix == ".py"]
            resources = [f for f in files if f.suffix != ".py"]
        lists[name] = {"MODULE_PYTHON_SCRIPTS": [f.as_posix() for f in scripts],
                       "MODULE_PYTHON_RESOURCES": [f.as_posix() for f in resources]}
    return lists


def listed(cmake_text: str) -> dict[str, list[str]]:
    """The entries between each ``# BEGIN VAR`` / ``# END VAR`` pair (``${MODULE_NAME}`` expanded
    with the file's ``set(MODULE_NAME ...)``)."""
    module_name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", cmake_text)
    out = {}
    for match in _BLOCK.finditer(cmake_text):
        entries = []
        for line in match["body"].splitlines():
            line = line.split("#")[0].strip()
            if line:
                entries.append(line.replace("${MODULE_NAME}", module_name.group(1) if module_name else "${MODULE_NAME}"))
        out[match["var"]] = entries
    return out


def render(cmake_text: str, lists: dict[str, list[str]], module_name: str | None = None) -> str:
    """``cmake_text`` with every maintained block replaced by ``lists`` (others kept)."""
    missing = set(lists) - {m["var"] for m in _BLOCK.finditer(cmake_text)}
    if missing:
        raise CMakeListsError(f"no '# BEGIN {sorted(missing)[0]}' ... '# END' block to rewrite; add the markers first")

    def replace(match: re.Match) -> str:
        var = match["var"]
        if var not in lists:
            return match.group(0)
        indent = re.match(r"[ \t]*", match["head"]).group(0)
        body = "".join(f"{indent}{_cmake_name(e, module_name)}\n" for e in lists[var])
        return match["head"] + body + match["tail"]

    return _BLOCK.sub(replace, cmake_text)


def _cmake_name(entry: str, module_name: str | None) -> str:
    if module_name and entry == f"{module_name}.py":
        return "${MODULE_NAME}.py"
    return entry


def differences(root: Path = ROOT) -> list[str]:
    """Human-readable stale entries (empty when every list matches the folders)."""
    problems = []
    for name, lists in expected_lists(root).items():
        cmake = root / name / "CMakeLists.txt"
        have = listed(cmake.read_text(encoding="utf-8"))
        for var, want in lists.items():
            got = have.get(var)
            if got is None:
                problems.append(f"{cmake.relative_to(root)}: no '# BEGIN {var}' block")
                continue
            for entry in sorted(set(want) - set(got)):
                problems.append(f"{cmake.relative_to(root)}: {var} lacks {entry} (it would be left out of the extension)")
            for entry in sorted(set(got) - set(want)):
                problems.append(f"{cmake.relative_to(root)}: {var} lists {entry}, which does not exist (CMake stops with FATAL_ERROR)")
    return problems


def update(root: Path = ROOT) -> list[Path]:
    """Rewrite the lists; returns the files that changed."""
    changed = []
    for name, lists in expected_lists(root).items():
        cmake = root / name / "CMakeLists.txt"
        text = cmake.read_text(encoding="utf-8")
        new = render(text, lists, module_name=name)
        if new != text:
            cmake.write_text(new, encoding="utf-8")
            changed.append(cmake)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale lists (exit status 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences()
        print("\n".join(problems) if problems else "CMake file lists are up to date")
        return 1 if problems else 0
    for path in update():
        print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
