#!/usr/bin/env bash
# Measures capture-to-event latency and callback timing through the virtual PulseAudio devices:
# runs the device-path capture test N times (default 5) and the callback timing test, and prints
# the medians. Needs `. .ci/pulse.sh` (or runs it) and tools/fetch_vad.sh's assets.
# Usage: tools/measure_audio_latency.sh [RUNS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-5}
# shellcheck source=../.ci/pulse.sh
. .ci/pulse.sh >/dev/null
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for i in $(seq "$runs"); do
    LFM2D_PULSE_TESTS=1 cargo test -q -p audio-io --test pulse_devices capture_finds \
        -- --nocapture 2>/dev/null | grep -E "^(SpeechStarted|SpeechEnded|capture stats)" >>"$log"
done
cargo test -q -p audio-io --test realtime callback_timing -- --nocapture 2>/dev/null \
    | grep "callback timing" >>"$log"
python3 - "$log" "$runs" <<'PY'
import re, statistics, sys
text = open(sys.argv[1]).read()
def to_float(v):
    # Durations print as 12.3µs, 1.2ms or 5ns; report them in µs.
    if isinstance(v, tuple):
        number, unit = v
        return float(number) * {"ns": 1e-3, "µs": 1.0, "ms": 1e3, "s": 1e6}[unit]
    return float(v)
def med(pattern):
    values = [to_float(v) for v in re.findall(pattern, text)]
    return (statistics.median(values), min(values), max(values), len(values)) if values else None
def show(label, pattern, unit="ms"):
    m = med(pattern)
    if m:
        print(f"{label}: median {m[0]:.1f} {unit} (min {m[1]:.1f}, max {m[2]:.1f}, n={m[3]})")
print(f"{sys.argv[2]} runs of tests/pulse_devices.rs capture_finds_utterance_boundaries_through_pulseaudio")
show("SpeechStarted: event after its deciding sample", r"SpeechStarted at [\d.]+s: event ([\d.]+) ms")
show("SpeechStarted: event after the true start of speech", r"SpeechStarted .* ms after its deciding sample, ([\d.]+) ms after the true start")
show("SpeechEnded: event after its deciding sample", r"SpeechEnded at [\d.]+s: event ([\d.]+) ms")
show("SpeechEnded: event after the true end of speech", r"SpeechEnded .* ms after its deciding sample, ([\d.]+) ms after the true end")
show("device capture callback, mean", r"capture stats: .*callback_mean: ([\d.]+)(ns|µs|ms|s)\b", "µs")
show("device capture callback, max", r"capture stats: .*callback_max: ([\d.]+)(ns|µs|ms|s)\b", "µs")
show("device period (frames at 48 kHz)", r"period_frames: (\d+)", "frames")
for line in text.splitlines():
    if "callback timing" in line:
        print(line)
PY
