"""The extension's CMake files: metadata, modules, and file lists that match the folders.

``slicerMacroBuildScriptedModule`` silently drops unlisted files from the installed extension
and stops on listed files that do not exist; the lists are compared with the file system here.
Fix a failure with ``python scripts/update_cmake_lists.py``.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lists_tool():
    spec = importlib.util.spec_from_file_location("update_cmake_lists", ROOT / "scripts" / "update_cmake_lists.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _calls(text: str, command: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"{command}\((.*?)\)\s*$", text, re.S | re.M)]


def test_top_level_metadata_and_modules():
    text = (ROOT / "CMakeLists.txt").read_text()
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert values.get(key), f"{key} is not set"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    # icon and screenshot point at files that exist in the repository
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        relative = values[key].split("${RECOKD_RAW_URL}/", 1)[1]
        assert (ROOT / relative).is_file(), f"{key} points at {relative}, which is not in the repository"
    assert "RECOKD_REPOSITORY_URL" in text and "PLACEHOLDER" in text
    assert re.findall(r"add_subdirectory\((\w+)\)", text) == ["ReCoKDLib", "ReCoKD"]
    for line in ("find_package(Slicer ${RECOKD_MINIMUM_SLICER_VERSION} REQUIRED)", "include(${Slicer_USE_FILE})",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text


def test_module_build_options():
    module = (ROOT / "ReCoKD" / "CMakeLists.txt").read_text()
    library = (ROOT / "ReCoKDLib" / "CMakeLists.txt").read_text()
    assert "set(MODULE_NAME ReCoKD)" in module and "WITH_GENERIC_TESTS" in module
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    assert "set(MODULE_NAME ReCoKDLib)" in library and "WITH_SUBDIR" in library
    for text in (module, library):
        assert "slicerMacroBuildScriptedModule(" in text
        assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in text and "RESOURCES ${MODULE_PYTHON_RESOURCES}" in text


def test_every_file_the_modules_need_is_listed(lists_tool):
    problems = lists_tool.differences(ROOT)
    assert not problems, "stale CMake file lists (run scripts/update_cmake_lists.py):\n" + "\n".join(problems)
    expected = lists_tool.expected_lists(ROOT)
    assert "ReCoKD.py" in expected["ReCoKD"]["MODULE_PYTHON_SCRIPTS"]
    assert {"Resources/UI/ReCoKD.ui", "Resources/Icons/ReCoKD.png", "Resources/requirements.txt"} <= set(
        expected["ReCoKD"]["MODULE_PYTHON_RESOURCES"])
    library = expected["ReCoKDLib"]["MODULE_PYTHON_SCRIPTS"]
    on_disk = sorted(p.relative_to(ROOT / "ReCoKDLib").as_posix() for p in (ROOT / "ReCoKDLib").rglob("*.py")
                     if "__pycache__" not in p.parts)
    assert library == on_disk and "mrml/__init__.py" in library and "__init__.py" in library


def test_update_script_finds_and_fixes_stale_lists(lists_tool, tmp_path):
    copy = tmp_path / "repo"
    for name in ("ReCoKD", "ReCoKDLib"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    lists_tool.update(copy)
    assert lists_tool.differences(copy) == []
    (copy / "ReCoKDLib" / "losses" / "new_method.py").write_text("")
    (copy / "ReCoKD" / "Resources" / "UI" / "ReCoKD.ui").unlink()
    problems = lists_tool.differences(copy)
    assert any("lacks losses/new_method.py" in p for p in problems)
    assert any("lists Resources/UI/ReCoKD.ui, which does not exist" in p for p in problems)
    changed = lists_tool.update(copy)
    assert len(changed) == 2 and lists_tool.differences(copy) == []
    text = (copy / "ReCoKD" / "CMakeLists.txt").read_text()
    assert "${MODULE_NAME}.py" in text and "WITH_GENERIC_TESTS" in text  # the rest of the file is kept
    with pytest.raises(lists_tool.CMakeListsError, match="BEGIN"):
        lists_tool.render("set(MODULE_NAME X)\n", {"MODULE_PYTHON_SCRIPTS": ["a.py"]})
