#!/usr/bin/env bash
# Measures `lfm2d serve` as a user hears it: spoken questions (espeak-ng) go into the virtual
# microphone, and for each turn it reports the time from the last voiced sample of the question
# to the first audible sample of the answer, and the silent gaps inside each answer. Both are
# read from ONE recording: every question is played through a combined sink into the
# microphone AND the speaker, so the speaker's monitor holds the question and the answer on the
# same clock. The daemon's own log line per turn ("answer audible N ms after the end of the
# question") is printed next to it, with its per-reply underrun count.
#
# Usage: tools/measure_turn_latency.sh [MODEL_DIR [QUANT [EXTRA SERVE ARGS...]]]
#   defaults: tests/fixtures/tiny-c/model f32. Environment: TURNS (default 5),
#   MAX_REPLY_TOKENS (default 100), LFM2D (default target/release/lfm2d, built if missing),
#   SPECULATIVE_START (default true; false: the reply starts only at the end of the silence),
#   PAUSE_MS (default 64: the silence that starts the speculative reply), DAEMON_LOG (a file to
#   keep the daemon's log in).
# Needs `. .ci/pulse.sh` (run here if needed) and tools/fetch_vad.sh's assets.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model=${1:-tests/fixtures/tiny-c/model}
quant=${2:-f32}
shift $(( $# > 2 ? 2 : $# ))
turns=${TURNS:-5}
lfm2d=${LFM2D:-target/release/lfm2d}
[ -x "$lfm2d" ] || cargo build --release --bin lfm2d
# shellcheck source=../.ci/pulse.sh
. .ci/pulse.sh >/dev/null

work=$(mktemp -d)
combine=""
daemon=""
recorder=""
cleanup() {
    [ -n "$recorder" ] && kill "$recorder" 2>/dev/null || true
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
    [ -n "$combine" ] && pactl unload-module "$combine" 2>/dev/null || true
    [ -n "${DAEMON_LOG:-}" ] && cp "$work/out.log" "$DAEMON_LOG" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

questions=(
    "What is the weather like today?"
    "Can you tell me a short story about a dog?"
    "How far away is the moon?"
    "What should I cook for dinner tonight?"
    "Why is the sky blue?"
    "What time is it in Tokyo?"
    "Tell me something interesting about octopuses."
    "How do I make a cup of tea?"
)
for i in $(seq 0 $((turns - 1))); do
    espeak-ng -w "$work/q$i.wav" "${questions[$((i % ${#questions[@]}))]}"
done

# One stream to both sinks: the microphone hears the question, the speaker's recording has it.
combine=$(pactl load-module module-combine-sink sink_name=lfm2d_both slaves=mic,spk)
printf '[assistant]\nmax_reply_tokens = %s\nbuiltin_tools = false\nspeculative_start = %s\n[vad]\npause_ms = %s\n' \
    "${MAX_REPLY_TOKENS:-100}" "${SPECULATIVE_START:-true}" "${PAUSE_MS:-64}" >"$work/c.toml"
"$lfm2d" serve --config "$work/c.toml" --model "$model" --quant "$quant" "$@" >"$work/out.log" 2>&1 &
daemon=$!
for _ in $(seq 600); do
    grep -q "listening" "$work/out.log" && break
    kill -0 "$daemon" 2>/dev/null || { cat "$work/out.log"; exit 1; }
    sleep 0.1
done
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
parecord --latency-msec=20 --channels=1 --rate=48000 -d spk.monitor --file-format=wav "$work/rec.wav" &
recorder=$!
sleep 1
rec_start=$(python3 -c 'import time; print(time.monotonic())')
# The recorder's first sample is about now minus its start-up; the question times below are only
# used to find each question in the recording, not to measure.
: >"$work/times"
for i in $(seq 0 $((turns - 1))); do
    t=$(python3 -c 'import time; print(time.monotonic())')
    echo "$t $(soxi -D "$work/q$i.wav")" >>"$work/times"
    paplay --latency-msec=20 -d lfm2d_both "$work/q$i.wav"
    # Wait for the reply to have played out (or 90 s), then a quiet second.
    want=$((i + 1))
    for _ in $(seq 900); do
        n=$(grep -c "reply played" "$work/out.log" || true)
        [ "$n" -ge "$want" ] && break
        # (A daemon without that line: the reply's length after its "(done)" line.)
        d=$(grep -c "assistant (done)" "$work/out.log" || true)
        if [ "$d" -ge "$want" ] && ! grep -q "reply played" "$work/out.log"; then
            s=$(grep "assistant (done)" "$work/out.log" | tail -1 | sed -E 's/.*, ([0-9.]+) s of speech.*/\1/')
            sleep "$(python3 -c "print(float('${s:-5}') + 1)")"
            break
        fi
        sleep 0.1
    done
    sleep 1.2
done
kill -TERM "$daemon"
wait "$daemon" || true
daemon=""
kill "$recorder"
wait "$recorder" 2>/dev/null || true
recorder=""
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$work" "$rec_start" "$turns" <<'PY'
import re, statistics, sys, wave, array
work, rec_start, turns = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
w = wave.open(f"{work}/rec.wav")
rate = w.getframerate()
data = array.array("h", w.readframes(w.getnframes()))
block = rate // 100  # 10 ms
loud = [max((abs(v) for v in data[i:i + block]), default=0) > 100 for i in range(0, len(data), block)]
# The recorder started about 1 s before rec_start (it was given a second to settle); find the
# offset from the first question: its first audible block.
times = [tuple(map(float, l.split())) for l in open(f"{work}/times")]
first = next(i for i, b in enumerate(loud) if b)
offset = first / 100 - (times[0][0] - rec_start)
def blk(t):
    return max(0, min(len(loud), int(round((t - rec_start + offset) * 100))))
rows = []
for k, (t, dur) in enumerate(times):
    # The question: the first sound from shortly before it was started on, through pauses
    # shorter than 0.3 s (the answer comes at least the endpoint's silence, 0.5 s, later).
    q0 = blk(t - 0.15)
    onset = next((i for i in range(q0, len(loud)) if loud[i]), None)
    if onset is None:
        rows.append((k, None, None, None)); continue
    q_end, i = onset + 1, onset
    while i < len(loud) and i - q_end < 30:
        if loud[i]:
            q_end = i + 1
        i += 1
    a_lo = q_end + 30
    a_hi = blk(times[k + 1][0] - 0.1) if k + 1 < len(times) else len(loud)
    ans = [i for i in range(a_lo, a_hi) if loud[i]]
    if not ans:
        rows.append((k, None, None, None)); continue
    a0, a1 = ans[0], ans[-1] + 1
    gaps, run = [], 0
    for i in range(a0, a1):
        if loud[i]:
            if run >= 4: gaps.append(run * 10)
            run = 0
        else:
            run += 1
    rows.append((k, (a0 - q_end) * 10, (a1 - a0) / 100, gaps))
log = open(f"{work}/out.log").read()
daemon = [float(x) for x in re.findall(r"answer audible (\d+) ms after the end of the question", log)]
played = re.findall(r"reply played: (.*)", log)
print(f"{turns} turns; question end -> first audible answer, from one recording of the speaker (10 ms blocks)")
delays = []
for k, d, span, gaps in rows:
    if d is None:
        print(f"  turn {k + 1}: no question or no answer found"); continue
    delays.append(d)
    dl = f"{daemon[k]:.0f} ms" if k < len(daemon) else "-"
    pl = played[k] if k < len(played) else "-"
    print(f"  turn {k + 1}: {d:5.0f} ms (daemon's clock: {dl}); answer {span:.2f} s, "
          f"{len(gaps)} silent gaps >= 40 ms ({sum(gaps)} ms); daemon: {pl}")
if delays:
    print(f"median {statistics.median(delays):.0f} ms, max {max(delays):.0f} ms, "
          f"n={len(delays)}; gaps >= 40 ms in answers: {sum(len(r[3]) for r in rows if r[3] is not None)}")
summary = re.findall(r".*stopped after.*", log)
if summary:
    print("daemon:", summary[-1])
PY
echo "load average before/after: $load_before / $load_after; CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
