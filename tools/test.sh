#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up the machine, start the virtual sound devices, then
# every test of the workspace (the device tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --no-build
# A private PulseAudio server with a virtual microphone and speaker (no sound card needed).
# shellcheck source=/dev/null
. .ci/pulse.sh
export LFM2D_PULSE_TESTS=1
cargo fmt --all -- --check
cargo test --workspace
# Each fuzz target for a short smoke run (tools/fuzz.sh SECONDS runs them longer).
bash tools/fuzz.sh 20
