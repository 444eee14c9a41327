#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) in turn for SECONDS each (default 60).
#   tools/fuzz.sh [--dev] [--build-only] [SECONDS] [TARGET...]
# --dev builds the targets unoptimised: less than half the build's CPU time and slower fuzzing,
# for a short smoke run (tools/test.sh); long runs want the default optimised build.
# --build-only builds the targets and stops (a later run with the same flags starts at once).
# A crash, a timeout (an input taking over 10 s) or an out-of-memory (over 2 GB) stops that
# target; its input is kept in fuzz/artifacts/TARGET/ and the script exits with status 1 after the
# other targets ran. The corpus grows in fuzz/corpus/TARGET/ (seeded from the test fixtures).
#
# Stable Rust works: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its instrumentation flags. The
# targets build without a sanitizer (safe Rust; the decoders' panics and overflows are what is
# looked for) and with debug assertions, so arithmetic overflow is a crash too.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=(--sanitizer none --debug-assertions)
build_only=false
while [ $# -gt 0 ]; do
    case "$1" in
    --dev) flags+=(--dev) ;;
    --build-only) build_only=true ;;
    *) break ;;
    esac
    shift
done
seconds="${1:-60}"
shift || true
export RUSTC_BOOTSTRAP=1
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build "${flags[@]}"
if $build_only; then
    exit 0
fi

# Seeds: small valid inputs of each kind, so the fuzzer starts past the first checks.
seed() {
    local dir="fuzz/corpus/$1"
    mkdir -p "$dir"
    shift
    "$@" "$dir"
}
seed_realtime() {
    printf '%s' '{"type":"session.update","session":{"modalities":["text","audio"],"instructions":"Hi","turn_detection":null,"tools":[{"type":"function","name":"f","parameters":{}}]}}' >"$1/session"
    printf '%s' '{"type":"input_audio_buffer.append","audio":"AAABAA=="}' >"$1/append"
    printf '%s' '{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"Hi"}]}}' >"$1/item"
    printf '%s' '{"type":"response.create","response":{"output_modalities":["audio"],"audio":{"output":{"format":{"type":"audio/pcm","rate":24000}}}}}' >"$1/response"
}
seed_config() {
    local i=0
    for f in tests/fixtures/tiny-*/model/config.json tests/fixtures/tiny-*/model/*/config.json; do
        [ -f "$f" ] && cp "$f" "$1/config$((i++))"
    done
}
seed_safetensors() {
    python3 -c '
import json, struct, sys
h = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]},
                "__metadata__": {"format": "pt"}}).encode()
sys.stdout.buffer.write(struct.pack("<Q", len(h)) + h + bytes(12))' >"$1/two"
}
seed_audio() {
    local f
    for f in tests/fixtures/audio/*.wav; do
        [ "$(stat -c %s "$f")" -le 8192 ] && cp "$f" "$1/$(basename "$f")"
    done
    return 0
}
seed_tools() {
    printf '%s' 'Sure.<|tool_call_start|>[get_weather(city="Paris", days=2), set_timer(seconds=5.5, label=None)]<|tool_call_end|>' >"$1/calls"
    printf '%s' '<|tool_call_start|>[{"name": "f", "arguments": {"a": [1, {"b": true}]}}]<|tool_call_end|>' >"$1/json"
}
seed_wyoming() {
    printf '%s\n' '{"type": "describe"}' >"$1/describe"
    printf '%s\n%s' '{"type": "transcript", "data_length": 50}' '{"text": "hi", "context": {"conversation_id": "c"}}' >"$1/transcript"
    printf '%s\n%s' '{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, "payload_length": 4}' 'abcd' >"$1/chunk"
}

failed=()
for t in "${targets[@]}"; do
    case "$t" in
    realtime_event) seed "$t" seed_realtime ;;
    model_config) seed "$t" seed_config ;;
    safetensors_header) seed "$t" seed_safetensors ;;
    audio_decode) seed "$t" seed_audio ;;
    tool_call) seed "$t" seed_tools ;;
    wyoming_event) seed "$t" seed_wyoming ;;
    *) mkdir -p "fuzz/corpus/$t" ;;
    esac
    echo "fuzz: $t for $seconds s"
    start=$(date +%s)
    if cargo fuzz run "${flags[@]}" "$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
        -print_final_stats=1 2>"fuzz/$t.log"; then
        echo "fuzz: $t ran clean for $(($(date +%s) - start)) s ($(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz/$t.log" | grep -o '[0-9]*$') inputs)"
    else
        echo "fuzz: $t FAILED after $(($(date +%s) - start)) s; see fuzz/$t.log and fuzz/artifacts/$t/"
        tail -n 30 "fuzz/$t.log"
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]}"
    exit 1
fi
