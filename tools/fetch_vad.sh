#!/usr/bin/env bash
# Fetches the two files the voice activity detector needs, pinned by version and sha256:
#   assets/onnxruntime/libonnxruntime.so.1.31.1  from PyPI onnxruntime==1.31.1
#                                                 (cp311 manylinux_2_28 x86_64 wheel; the .so does
#                                                 not depend on the Python version, so any python3
#                                                 with pip can fetch it)
#   assets/silero_vad.onnx                        from PyPI silero-vad==6.2.3
# Idempotent: a file already present with the right hash is left alone.
# Usage: tools/fetch_vad.sh [ASSETS_DIR]   (default: <repo>/assets)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
assets=${1:-$repo/assets}

ORT_VERSION=1.31.1
ORT_WHEEL_PLATFORM=manylinux_2_28_x86_64
ORT_WHEEL_PYTHON=311
ORT_LIB_SHA256=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
SILERO_VERSION=6.2.3
SILERO_SHA256=1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3

ort_lib=$assets/onnxruntime/libonnxruntime.so.$ORT_VERSION
vad_model=$assets/silero_vad.onnx

has_sha() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# extract WHEEL MEMBER DEST SHA256: copies one member out of a wheel (a zip) and checks its hash.
extract() {
    local tmp="$3.part"
    mkdir -p "$(dirname "$3")"
    python3 - "$1" "$2" "$tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
    local got
    got=$(sha256sum "$tmp" | cut -d' ' -f1)
    if [ "$got" != "$4" ]; then
        rm -f "$tmp"
        echo "fetch_vad: sha256 mismatch for $2 from $(basename "$1"): got $got, expected $4" >&2
        exit 1
    fi
    mv "$tmp" "$3"
    echo "fetch_vad: wrote $3"
}

need_ort=1; need_vad=1
has_sha "$ort_lib" "$ORT_LIB_SHA256" && need_ort=0
has_sha "$vad_model" "$SILERO_SHA256" && need_vad=0
if [ $need_ort = 0 ] && [ $need_vad = 0 ]; then
    echo "fetch_vad: $ort_lib and $vad_model are present and verified"
    exit 0
fi

command -v python3 >/dev/null || { echo "fetch_vad: python3 with pip is needed to download the wheels" >&2; exit 1; }
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT

if [ $need_ort = 1 ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform "$ORT_WHEEL_PLATFORM" --python-version "$ORT_WHEEL_PYTHON" \
        "onnxruntime==$ORT_VERSION" -d "$dl"
    extract "$dl"/onnxruntime-"$ORT_VERSION"-*.whl "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" \
        "$ort_lib" "$ORT_LIB_SHA256"
fi
if [ $need_vad = 1 ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: "silero-vad==$SILERO_VERSION" -d "$dl"
    extract "$dl"/silero_vad-"$SILERO_VERSION"-*.whl silero_vad/data/silero_vad.onnx \
        "$vad_model" "$SILERO_SHA256"
fi
