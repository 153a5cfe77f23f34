#!/usr/bin/env bash
# The package as a user installs it: build the sdist and the wheel (the wheel from the sdist), install
# the wheel into a fresh venv WITHOUT an editable install, and run .ci/wheel_smoke.py from it (imports
# from the venv, the declared dependencies, the console script, a 2-process CPU fit).
#
#   bash .ci/wheel_check.sh [VENV]     # VENV: the venv with the dev extra installed (default .venv)
#
# Offline and fast: the build uses VENV's setuptools (--no-isolation), and the fresh venv reuses VENV's
# packages (torch, lightning, ...) through a .pth line instead of downloading them again; its own
# site-packages, where the wheel goes, comes first on sys.path. VENV's .pth files (its editable
# lightning_gmc among them) are not run from there, so the wheel's copy is the one imported.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
venv="$(cd "${1:-.venv}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

"$venv/bin/python" -m build --no-isolation --outdir "$work/dist" . > "$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/lightning_gmc-*.tar.gz)
wheel=$(ls "$work"/dist/lightning_gmc-*.whl)
echo "built $(basename "$sdist") and $(basename "$wheel") in $((SECONDS - start)) s"

"$venv/bin/python" -m venv "$work/env"
packages="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
own="$("$work/env/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
echo "$packages" > "$own/_ci_reuse_packages.pth"
"$work/env/bin/python" -m pip install -q --no-index --no-deps --disable-pip-version-check "$wheel"
echo "installed the wheel into a fresh venv in $((SECONDS - start)) s"

(cd "$work" && OMP_NUM_THREADS=1 "$work/env/bin/python" "$repo/.ci/wheel_smoke.py" "$repo")
echo "wheel check passed in $((SECONDS - start)) s"
