#!/usr/bin/env bash
# Virtual sound devices for the audio tests: a private PulseAudio server with two null sinks,
#   mic  - whatever is played into it is what the "microphone" (default source mic.monitor) hears
#   spk  - the default sink, the "speaker"; record it from spk.monitor
# and ALSA's default device routed to it (the `pulse` plugin), so cpal's default ALSA devices are
# these two. Runs in real time on a machine without a sound card.
#
# Source it (`. .ci/pulse.sh`) so PULSE_SERVER is exported to what runs next; running it prints
# the export line instead. Safe to run twice: an already running server is reused.
#
# Installs (apt-get, only if missing): pulseaudio pulseaudio-utils libasound2-plugins espeak-ng
# sox alsa-utils libasound2-dev pkg-config. libasound2-dev and pkg-config are needed to BUILD the
# workspace (cpal links ALSA), so run this before the first cargo command.

lfm2d_pulse_setup() {
    local packages=(pulseaudio pulseaudio-utils libasound2-plugins espeak-ng sox alsa-utils libasound2-dev pkg-config)
    local missing=()
    local p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "pulse.sh: installing ${missing[*]}"
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo"
        $sudo apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null || return 1
    fi

    local dir=${LFM2D_PULSE_DIR:-/tmp/lfm2d-pulse-$(id -u)}
    mkdir -p "$dir" && chmod 700 "$dir"
    export PULSE_SERVER="unix:$dir/native"
    # A private runtime dir and no autospawn keep clients away from any other server.
    export PULSE_RUNTIME_PATH="$dir"

    if ! pactl info >/dev/null 2>&1; then
        # Root may run a per-user server; --system would change the socket and permissions.
        pulseaudio --daemonize=yes --exit-idle-time=-1 --disallow-exit=yes --use-pid-file=yes \
            -n --log-target=file:"$dir/log" \
            --load="module-native-protocol-unix socket=$dir/native auth-anonymous=1" \
            --load="module-null-sink sink_name=mic sink_properties=device.description=mic" \
            --load="module-null-sink sink_name=spk sink_properties=device.description=spk" \
            --load="module-always-sink" 2>>"$dir/log" || {
            echo "pulse.sh: pulseaudio did not start; log:" >&2
            tail -20 "$dir/log" >&2
            return 1
        }
        local i
        for i in $(seq 50); do
            pactl info >/dev/null 2>&1 && break
            sleep 0.1
        done
    fi
    pactl info >/dev/null 2>&1 || { echo "pulse.sh: server at $PULSE_SERVER does not answer" >&2; return 1; }
    pactl set-default-sink spk
    pactl set-default-source mic.monitor

    # ALSA default -> pulse, for this user only (ALSA reads ~/.asoundrc). An existing file that
    # is not ours is left alone and reported.
    local home=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
    local asoundrc="$home/.asoundrc"
    local marker="# written by lfm2d .ci/pulse.sh"
    if [ ! -e "$asoundrc" ] || grep -q "$marker" "$asoundrc"; then
        cat >"$asoundrc" <<ASOUND
$marker
pcm.!default { type pulse }
ctl.!default { type pulse }
ASOUND
    elif ! grep -q "type pulse" "$asoundrc"; then
        echo "pulse.sh: $asoundrc exists and does not route ALSA to pulse; the device tests may not reach the server" >&2
    fi
    echo "pulse.sh: PulseAudio at $PULSE_SERVER; default sink spk, default source mic.monitor"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    lfm2d_pulse_setup
    echo "export PULSE_SERVER=$PULSE_SERVER PULSE_RUNTIME_PATH=$PULSE_RUNTIME_PATH"
else
    lfm2d_pulse_setup
fi
