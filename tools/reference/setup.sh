#!/usr/bin/env bash
# Create the Python environment used to regenerate the reference fixtures.
#
#   bash tools/reference/setup.sh [VENV_DIR]
#
# VENV_DIR defaults to .venv-ref in the repository root. Python 3.12 is taken from
# `python3.12` on PATH, else from pyenv. Set TORCH_INDEX_URL (for example
# https://download.pytorch.org/whl/cpu) to install CPU-only torch/torchaudio wheels, which
# are much smaller than the default ones and give the same CPU results.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/.venv-ref}"

find_python() {
    if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        command -v python3.12
        return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        local v
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -t. -k3 -n -r); do
            local p
            p="$(pyenv root)/versions/$v/bin/python3.12"
            if [ -x "$p" ]; then
                echo "$p"
                return 0
            fi
        done
    fi
    return 1
}

if ! py="$(find_python)"; then
    echo "error: Python 3.12 not found (looked for python3.12 on PATH and pyenv 3.12.x versions)." >&2
    echo "Install Python 3.12 (e.g. 'pyenv install 3.12') and re-run." >&2
    exit 1
fi

echo "using $py ($("$py" --version 2>&1)); venv: $venv"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$venv/bin/python" -m pip install --index-url "$TORCH_INDEX_URL" 'torch==2.11.*' 'torchaudio==2.11.*'
fi
"$venv/bin/python" -m pip install -r "$here/requirements.txt"
echo "done: $venv/bin/python tools/reference/make_fixtures.py"
