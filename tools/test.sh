#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up the machine, start the virtual sound devices, then
# every test of the workspace (the device tests included) and a short run of each fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --system
# A private PulseAudio server with a virtual microphone and speaker (no sound card needed).
# shellcheck source=/dev/null
. .ci/pulse.sh
export LFM2D_PULSE_TESTS=1
cargo fmt --all -- --check
# The tests build while the rest of the setup (pinned assets and Python clients: downloads,
# mostly) runs beside it; the build's output is shown once both are done.
build_log=$(mktemp)
cargo test --workspace --no-run >"$build_log" 2>&1 &
build=$!
if ! bash tools/setup.sh --no-build; then
    kill "$build" 2>/dev/null || true
    exit 1
fi
if ! wait "$build"; then
    cat "$build_log"
    exit 1
fi
tail -n 3 "$build_log"
rm -f "$build_log"
# The fuzz targets (their own workspace and target dir) build beside the tests, at the lowest
# priority: much of the suite waits on real-time audio and leaves the cores idle.
fuzz_log=$(mktemp)
nice -n 19 bash tools/fuzz.sh --dev --build-only >"$fuzz_log" 2>&1 &
fuzz_build=$!
if ! cargo test --workspace; then
    kill "$fuzz_build" 2>/dev/null || true
    exit 1
fi
if ! wait "$fuzz_build"; then
    cat "$fuzz_log"
    exit 1
fi
rm -f "$fuzz_log"
# Each fuzz target for a short smoke run, built unoptimised (the optimised build alone took
# about a third of the suite's time on two cores); tools/fuzz.sh SECONDS runs them longer.
bash tools/fuzz.sh --dev 10
