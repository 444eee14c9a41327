#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up the machine, then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# Live-audio tests run against a private PulseAudio server with virtual devices when available.
if [ -f .ci/pulse.sh ]; then
    # shellcheck source=/dev/null
    source .ci/pulse.sh
fi
cargo fmt --all -- --check
cargo test --workspace
