//! Echo cancellation on real speech through a simulated room, with a simulated sound card and
//! clock, so the numbers are reproducible:
//!
//! - The assistant speaks two replies (espeak-ng, resampled to the 24 kHz playback rate). A
//!   simulated daemon pushes them to an `EchoReference` in 80 ms chunks, as fast as a 2 s
//!   playback ring allows, with the `played()` counter a device with 20 ms periods would show.
//! - What the device played (at 16 kHz) goes through a synthetic room impulse response (direct
//!   sound, early reflections, an exponentially decaying diffuse tail, RT60 250 ms) and a bulk
//!   delay (device buffers and air) into the microphone, with a noise floor at -70 dBFS.
//! - 5 s into the first reply the playback stalls for 40 ms (an underrun: the counter stops,
//!   the speaker is silent, and everything after comes 40 ms later).
//! - A user (another espeak-ng voice) talks over the second reply (double talk), and once more
//!   after it.
//! - The canceller gets 32 ms microphone windows 1-4 ms after their last sample, and the
//!   Silero VAD judges its output.
//!
//! Checked: the measured delay, ERLE on echo alone (steady state, and after the double talk),
//! how well the user's voice survives the double talk, and that the gate never takes the echo
//! for the user while it does take the user.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use audio_io::echo::{EchoCanceller, EchoConfig, EchoMode, EchoReference};
use audio_io::read_wav;
use audio_io::resample::resample_clip;
use audio_io::vad::WINDOW;
use lfm2_audio::format::OUTPUT_SAMPLE_RATE;

const FS: usize = 16_000;
/// Device output + input buffers + the air, in 16 kHz samples (70 ms).
const BULK_DELAY: usize = 1120;

fn espeak_as(text: &str, voice: &str, pitch: u32, dir: &Path, name: &str) -> Vec<f32> {
    let path = dir.join(format!("{name}.wav"));
    let status = Command::new("espeak-ng")
        .args(["-v", voice, "-s", "165", "-p", &pitch.to_string(), "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .expect("espeak-ng is needed for this test; `.ci/pulse.sh` installs it");
    assert!(status.success(), "espeak-ng failed");
    let (samples, format) = read_wav(&path).unwrap();
    resample_clip(&samples, format.sample_rate, FS as u32).unwrap()
}

/// Deterministic uniform noise in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// A small room at 16 kHz: direct sound, six early reflections within 15 ms, and a diffuse
/// tail decaying 60 dB in 250 ms, 300 ms long, normalised to a peak of 1.
fn room_impulse_response() -> Vec<f32> {
    let mut rng = Lcg(99);
    let len = FS * 300 / 1000;
    let rt60 = 0.25;
    let mut h: Vec<f32> = (0..len)
        .map(|k| {
            let t = k as f32 / FS as f32;
            if k < 32 {
                0.0
            } else {
                0.1 * rng.next() * (-6.9 * t / rt60).exp()
            }
        })
        .collect();
    h[0] = 1.0;
    for (k, g) in [
        (45, -0.5),
        (77, 0.4),
        (110, 0.35),
        (151, -0.3),
        (190, 0.25),
        (240, -0.2),
    ] {
        h[k] += g;
    }
    h
}

fn convolve(x: &[f32], h: &[f32]) -> Vec<f32> {
    // Straight convolution is slow for 300 ms kernels on 20 s; go through blocks of FFTs
    // would be faster, but this stays under a second with opt-level 3.
    let mut y = vec![0.0f32; x.len()];
    for (k, &hk) in h.iter().enumerate() {
        if hk == 0.0 {
            continue;
        }
        for (yn, xn) in y[k..].iter_mut().zip(x) {
            *yn += hk * xn;
        }
    }
    y
}

fn energy(v: &[f32]) -> f64 {
    v.iter().map(|s| f64::from(*s) * f64::from(*s)).sum()
}

fn db(ratio: f64) -> f64 {
    10.0 * ratio.max(1e-30).log10()
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    dot / (energy(a) * energy(b)).sqrt().max(1e-30)
}

/// 10 ms frames of `v` within 40 dB of its loudest: where there is sound.
fn active_frames(v: &[f32]) -> Vec<bool> {
    let frame = FS / 100;
    let e: Vec<f64> = v.chunks(frame).map(energy).collect();
    let loudest = e.iter().cloned().fold(0.0, f64::max);
    e.iter().map(|&x| x > loudest * 1e-4).collect()
}

struct Turn {
    /// Wall index (16 kHz) at which the device starts consuming the reply.
    start: usize,
    audio24: Vec<f32>,
    /// The device stalls (an underrun: silence is heard, the counter stops) this far into the
    /// reply, for this long (16 kHz samples).
    stall: Option<(usize, usize)>,
}

impl Turn {
    /// 16 kHz samples the device has consumed `elapsed` samples after the reply began.
    fn consumed(&self, elapsed: usize) -> usize {
        match self.stall {
            Some((at, len)) if elapsed >= at => at.max(elapsed.saturating_sub(len)),
            _ => elapsed,
        }
    }

    /// What is heard of `clip` (the reply at 16 kHz), the stall included.
    fn heard(&self, clip: &[f32]) -> Vec<f32> {
        let mut out = clip.to_vec();
        if let Some((at, len)) = self.stall {
            out.splice(at..at, std::iter::repeat_n(0.0, len));
        }
        out
    }
}

#[test]
fn cancels_speech_echo_in_a_simulated_room_and_keeps_the_user() {
    let dir = common::scratch_dir("echo-sim");
    // The assistant.
    let reply1 = espeak_as(
        "Sure. The weather today is mostly sunny, with a high of twenty three degrees \
         and a light breeze from the west. Tomorrow looks a little cooler.",
        "en-us",
        50,
        &dir,
        "reply1",
    );
    let reply2 = espeak_as(
        "Here is a recipe for pancakes. You need flour, milk, two eggs, a pinch of salt \
         and some butter for the pan. Mix everything until smooth and let it rest.",
        "en-us",
        50,
        &dir,
        "reply2",
    );
    // The user: another voice.
    let user1 = espeak_as(
        "Stop, stop. Tell me about dinner instead",
        "en-gb-scotland+f3",
        75,
        &dir,
        "user1",
    );
    let user2 = espeak_as(
        "Thank you, that was great",
        "en-gb-scotland+f3",
        75,
        &dir,
        "user2",
    );

    let to24 = |v: &[f32]| resample_clip(v, FS as u32, OUTPUT_SAMPLE_RATE).unwrap();
    let stall = (5 * FS, 640);
    let turn1 = Turn {
        start: FS,
        audio24: to24(&reply1),
        stall: Some(stall),
    };
    let reply1 = turn1.heard(&reply1);
    let turn2_start = turn1.start + reply1.len() + FS * 3 / 2;
    let turn2 = Turn {
        start: turn2_start,
        audio24: to24(&reply2),
        stall: None,
    };
    let total = turn2.start + reply2.len() + FS * 4;

    // What the speaker played, at 16 kHz on the wall clock.
    let mut played16 = vec![0.0f32; total];
    for (turn, clip) in [(&turn1, &reply1), (&turn2, &reply2)] {
        played16[turn.start..turn.start + clip.len()].copy_from_slice(clip);
    }
    // Echo at about -26 dBFS RMS for speech at -20.
    let mut echo = convolve(&played16, &room_impulse_response());
    echo.rotate_right(BULK_DELAY);
    echo[..BULK_DELAY].fill(0.0);
    let gain = 0.5;
    echo.iter_mut().for_each(|v| *v *= gain);
    // The user: over the second reply 1.5 s in, and 1 s after it.
    let mut near = vec![0.0f32; total];
    let talk1 = turn2.start + FS * 3 / 2;
    let talk2 = turn2.start + reply2.len() + BULK_DELAY + FS;
    let user_gain =
        (energy(&echo[talk1..talk1 + user1.len()]) / energy(&user1).max(1e-12)).sqrt() as f32;
    for (at, clip) in [(talk1, &user1), (talk2, &user2)] {
        for (n, v) in near[at..at + clip.len()].iter_mut().zip(clip.iter()) {
            *n = v * user_gain;
        }
    }
    let mut rng = Lcg(5);
    let mic: Vec<f32> = (0..total)
        .map(|n| echo[n] + near[n] + 3e-4 * 1.732 * rng.next())
        .collect();

    for mode in [EchoMode::Cancel, EchoMode::Gate] {
        let run = simulate(mode, &mic, &[&turn1, &turn2], total);
        let out = &run.out;
        assert_eq!(out.len(), total / WINDOW * WINDOW);

        let stats = run.stats;
        println!("\n{mode}: {stats:?}");
        // The delay is counted from the anchoring of each reply (its first push, 7 ms before
        // the device took it) to the microphone's clock (1 ms late at best).
        let truth_ms = BULK_DELAY as f32 / 16.0 + 7.0 + 1.0;
        let delay = stats.delay_ms.expect("no delay measured");
        println!(
            "delay measured {delay:.2} ms, expected {truth_ms:.2} ms ({:.2} ms bulk + 7 ms \
             anchoring + 1 ms hand-in)",
            BULK_DELAY as f32 / 16.0
        );
        assert!(
            (delay - truth_ms).abs() < 0.5,
            "delay {delay} ms vs {truth_ms} ms"
        );

        // The gate: speech starts while the assistant talks must never be taken for the user
        // unless the user talks.
        let user_frames = active_frames(&near);
        let user_at = |s: usize| user_frames.get(s / (FS / 100)).copied().unwrap_or(false);
        let mut false_windows = Vec::new();
        for (w, &user) in run.user_speech.iter().enumerate() {
            // The vote looks back 8 windows; allow it that long after the user stopped.
            let recent_user = (0..10).any(|k| w >= k && user_at((w - k) * WINDOW));
            if user && !recent_user {
                false_windows.push(w as f64 * WINDOW as f64 / FS as f64);
            }
        }
        let detect = |at: usize| {
            run.user_speech
                .iter()
                .enumerate()
                .skip(at / WINDOW)
                .find(|(_, &u)| u)
                .map(|(w, _)| (w * WINDOW) as f64 / FS as f64 - at as f64 / FS as f64)
        };
        println!(
            "reply 1 {:.2}-{:.2} s, reply 2 {:.2}-{:.2} s, user {:.2}-{:.2} s and {:.2}-{:.2} s",
            turn1.start as f64 / 16e3,
            (turn1.start + reply1.len()) as f64 / 16e3,
            turn2.start as f64 / 16e3,
            (turn2.start + reply2.len()) as f64 / 16e3,
            talk1 as f64 / 16e3,
            (talk1 + user1.len()) as f64 / 16e3,
            talk2 as f64 / 16e3,
            (talk2 + user2.len()) as f64 / 16e3,
        );
        let over_echo = detect(talk1);
        let alone = detect(talk2);
        println!(
            "gate: user over the echo detected after {over_echo:?} s, alone after {alone:?} s; \
             windows taken for the user without one: {false_windows:?}"
        );
        let gate_ok = false_windows.is_empty()
            && over_echo.is_some_and(|t| t < 0.6)
            && alone.is_some_and(|t| t < 0.6);

        if mode != EchoMode::Cancel {
            assert!(gate_ok, "gate: echo passed or the user was missed");
            continue;
        }
        // ERLE on echo alone, from 2 s into the first reply (steady state) to the end of the
        // reply; and on the second reply after the double talk.
        let echo_frames = active_frames(&echo);
        let erle_over = |from: usize, to: usize| {
            let frame = FS / 100;
            let (mut m, mut o) = (0.0, 0.0);
            for f in from / frame..to / frame {
                if echo_frames[f] && !user_frames[f] {
                    m += energy(&mic[f * frame..(f + 1) * frame]);
                    o += energy(&out[f * frame..(f + 1) * frame]);
                }
            }
            db(m / o)
        };
        let first_second = erle_over(turn1.start, turn1.start + FS);
        let steady = erle_over(turn1.start + 2 * FS, turn1.start + stall.0);
        let after_stall = erle_over(turn1.start + stall.0 + FS, turn1.start + reply1.len());
        let second_reply_start = erle_over(turn2.start, turn2.start + FS / 2);
        let after_double_talk = erle_over(talk1 + user1.len() + FS / 2, turn2.start + reply2.len());
        let profile: Vec<String> = (0..reply1.len() / FS)
            .map(|k| {
                format!(
                    "{:.0}",
                    erle_over(turn1.start + k * FS, turn1.start + (k + 1) * FS)
                )
            })
            .collect();
        println!(
            "ERLE per second of the first reply (dB): {}",
            profile.join(" ")
        );
        println!(
            "ERLE: first second {first_second:.1} dB, steady state {steady:.1} dB, first 0.5 s \
             of the second reply {second_reply_start:.1} dB, after the double talk \
             {after_double_talk:.1} dB; from 1 s after the 40 ms stall to the end of the first \
             reply {after_stall:.1} dB"
        );

        // Double talk: the user's voice in the output.
        let span = talk1..talk1 + user1.len();
        let residual: Vec<f32> = out[span.clone()]
            .iter()
            .zip(&near[span.clone()])
            .map(|(o, n)| o - n)
            .collect();
        let raw_residual: Vec<f32> = mic[span.clone()]
            .iter()
            .zip(&near[span.clone()])
            .map(|(o, n)| o - n)
            .collect();
        let near_e = energy(&near[span.clone()]);
        let corr_out = correlation(&out[span.clone()], &near[span.clone()]);
        let corr_mic = correlation(&mic[span.clone()], &near[span.clone()]);
        println!(
            "double talk: user-to-echo ratio {:.1} dB in the microphone, user-to-residual \
             {:.1} dB after the canceller; correlation with the clean user {corr_mic:.3} \
             (microphone) -> {corr_out:.3} (output)",
            db(near_e / energy(&raw_residual)),
            db(near_e / energy(&residual)),
        );
        assert!(gate_ok, "gate: echo passed or the user was missed");
        assert!(steady >= 20.0, "steady-state ERLE {steady:.1} dB");
        assert!(
            after_stall >= 15.0,
            "ERLE after the stall {after_stall:.1} dB"
        );
        assert!(
            after_double_talk >= 15.0,
            "ERLE after double talk {after_double_talk:.1} dB"
        );
        assert!(
            corr_out >= 0.95,
            "the user's voice was damaged ({corr_out})"
        );
    }
}

struct Run {
    out: Vec<f32>,
    /// The gate's verdict after each window.
    user_speech: Vec<bool>,
    stats: audio_io::echo::EchoStats,
}

/// Runs the canceller (and the VAD on what it hands on) over `mic`, with the daemon's pushes
/// and the playback counter simulated on the same clock.
fn simulate(mode: EchoMode, mic: &[f32], turns: &[&Turn], total: usize) -> Run {
    let reference = EchoReference::new(OUTPUT_SAMPLE_RATE).unwrap();
    let base = Instant::now() + Duration::from_secs(1);
    let at = |wall: f64| base + Duration::from_secs_f64(wall / FS as f64);
    let config = EchoConfig {
        mode,
        ..EchoConfig::default()
    };
    let mut canceller = EchoCanceller::new(config, reference.clone());
    let mut vad = common::load_vad();

    // The daemon's pushes: (wall, turn, first sample, played counter then).
    const CHUNK: usize = 1920; // 80 ms at 24 kHz
    const RING: usize = 2 * 24_000;
    const PERIOD: usize = 320; // 20 ms at 16 kHz
    let mut pushes = Vec::new();
    let mut played_before = 0u64;
    for turn in turns {
        // The playback's counter: whole periods consumed since the turn started.
        let played_at = |wall: usize| -> u64 {
            if wall < turn.start {
                return played_before;
            }
            let periods = turn.consumed(wall - turn.start) / PERIOD + 1;
            played_before + (periods * 480).min(turn.audio24.len()) as u64
        };
        // The first chunk goes out 7 ms before the device's next period takes it.
        let mut wall = turn.start - 112;
        for (i, _) in turn.audio24.chunks(CHUNK).enumerate() {
            let written = played_before as usize + i * CHUNK;
            // A full ring blocks the writer until the callback makes room.
            while written + CHUNK > played_at(wall) as usize + RING {
                wall += PERIOD;
            }
            pushes.push((wall, turn, i * CHUNK, played_at(wall)));
        }
        played_before += turn.audio24.len() as u64;
    }

    let mut out = Vec::with_capacity(total);
    let mut user_speech = Vec::new();
    let mut next_push = 0;
    let mut jitter = Lcg(17);
    let mut cleaned = Vec::with_capacity(WINDOW);
    let mut busy = Duration::ZERO;
    for (w, window) in mic.chunks_exact(WINDOW).enumerate() {
        let end = (w + 1) * WINDOW;
        // Handed in 1-4 ms after its last sample was captured.
        let handed = end as f64 + 16.0 + 24.0 * f64::from(jitter.next() + 1.0);
        while next_push < pushes.len() && (pushes[next_push].0 as f64) <= handed {
            let (wall, turn, first, played) = pushes[next_push];
            let chunk = &turn.audio24[first..(first + CHUNK).min(turn.audio24.len())];
            reference.push_at(chunk, played, at(wall as f64));
            if first + CHUNK >= turn.audio24.len() {
                reference.finish();
            }
            next_push += 1;
        }
        cleaned.clear();
        let started = Instant::now();
        canceller.process_at(window, at(handed), &mut cleaned);
        busy += started.elapsed();
        assert_eq!(cleaned.len(), WINDOW);
        let vad_input = if mode == EchoMode::Cancel {
            &cleaned
        } else {
            window
        };
        let prob = vad.probability(vad_input).unwrap();
        let started = Instant::now();
        canceller.judge(prob >= 0.5);
        busy += started.elapsed();
        user_speech.push(canceller.is_user_speech());
        out.extend_from_slice(&cleaned);
    }
    let windows = mic.len() / WINDOW;
    println!(
        "{mode}: the canceller took {:.0} µs per 32 ms window ({:.2} % of real time)",
        busy.as_secs_f64() * 1e6 / windows as f64,
        busy.as_secs_f64() / (windows as f64 * 0.032) * 100.0
    );
    Run {
        out,
        user_speech,
        stats: canceller.status().snapshot(),
    }
}
