//! Tests through a real device path: cpal → ALSA → the `pulse` plugin → a private PulseAudio
//! server whose null sinks run in real time (`.ci/pulse.sh` starts it). Skipped, loudly, unless
//! LFM2D_PULSE_TESTS is set.
//!
//! - Capture: espeak-ng speech with pauses is played into the virtual microphone (`pactl
//!   play-sample NAME mic`; the default source is `mic.monitor`); the listener's utterance
//!   boundaries must be within 100 ms of the truth. The capture is aligned to the played file by
//!   correlation, so the check does not depend on when playing got going.
//! - Playback: speech written to `DevicePlayback` (24 kHz → the device rate) is recorded from
//!   the speaker's monitor (`parec -d spk.monitor`) and must correlate with what was written,
//!   with no underruns and the played-sample counter matching.
//!
//! Killing the sound server under a process leaves libpulse threads of the dead streams behind
//! in it, and later streams of that process glitch; so that test is in `pulse_restart.rs`, a
//! process of its own.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use audio_io::vad::VadEvent;
use audio_io::{
    write_wav, DeviceCapture, DevicePlayback, DeviceSelector, ListenEvent, Listener,
    ListenerConfig, Playback,
};
use lfm2_audio::format::OUTPUT_SAMPLE_RATE;

/// The two tests share one sound server; run them one at a time.
static SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pactl(args: &[&str]) {
    let status = Command::new("pactl")
        .args(args)
        .status()
        .expect("pactl (pulseaudio-utils) is needed; `.ci/pulse.sh` installs it");
    assert!(status.success(), "pactl {args:?} failed");
}

#[test]
fn capture_finds_utterance_boundaries_through_pulseaudio() {
    if !common::pulse_tests_enabled("capture_finds_utterance_boundaries_through_pulseaudio") {
        return;
    }
    let _server = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    let dir = common::scratch_dir("pulse-capture");
    let clip = common::speech_with_pauses(&dir);
    let wav = dir.join("speech.wav");
    write_wav(&wav, &clip.samples, clip.format()).unwrap();

    let capture = DeviceCapture::open(&DeviceSelector::Default).unwrap_or_else(|e| panic!("{e}"));
    let config = ListenerConfig {
        tap_audio: true,
        ..ListenerConfig::default()
    };
    let listener = Listener::start(Box::new(capture), common::load_vad(), config).unwrap();

    // Wait for the stream to deliver (a cold capture stream can take a second).
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events
        .iter()
        .any(|e| matches!(e, ListenEvent::Audio { .. }))
    {
        assert!(
            Instant::now() < deadline,
            "no audio from the capture device: {events:?}"
        );
        if let Ok(e) = listener.events().recv_timeout(Duration::from_millis(100)) {
            events.push(e);
        }
    }
    std::thread::sleep(Duration::from_millis(300));

    // The file is uploaded to the server and played from there: a client like `paplay` can
    // underrun on a busy machine, and the server then inserts silence into the "microphone".
    let name = format!("lfm2d-test-{}", std::process::id());
    pactl(&["upload-sample", wav.to_str().unwrap(), &name]);
    pactl(&["play-sample", &name, "mic"]);
    std::thread::sleep(audio_io::frames_to_duration(
        clip.samples.len() as u64,
        clip.rate,
    ));
    pactl(&["remove-sample", &name]);
    // The last phrase ends 1.5 s before the file does; give the endpointer its 500 ms and more.
    std::thread::sleep(Duration::from_millis(800));
    listener.request_stop();
    events.extend(listener.events().iter());

    let Some(ListenEvent::Stopped { stats, error }) = events.last().cloned() else {
        panic!("no Stopped event: {events:?}")
    };
    assert_eq!(error, None);
    println!("capture stats: {stats:?}");
    assert_eq!(stats.xruns, 0, "capture ring overflowed");

    // Everything the listener processed, at 16 kHz, and where the played file sits in it.
    let mut captured = Vec::new();
    for e in &events {
        if let ListenEvent::Audio { at, samples } = e {
            let at_sample = (at.as_secs_f64() * 16_000.0).round() as usize;
            assert_eq!(at_sample, captured.len(), "audio tap not contiguous");
            captured.extend_from_slice(samples);
        }
    }
    let reference = audio_io::resample::resample_clip(&clip.samples, clip.rate, 16_000).unwrap();
    let dump = dir.join("captured.wav");
    write_wav(&dump, &captured, audio_io::StreamFormat::new(16_000, 1)).unwrap();
    println!("captured audio: {}", dump.display());
    let (offset, correlation) = common::align(&reference, &captured, 16_000);
    println!(
        "played file found at {:.3} s of the capture, correlation {correlation:.3}",
        offset as f64 / 16e3
    );
    assert!(
        correlation > 0.9,
        "the captured audio does not match what was played ({correlation})"
    );

    let found = common::utterances(&events);
    common::check_boundaries(&found, &clip.truth, offset as f64 / 16_000.0);

    // Capture-to-event latency: from the deciding sample's capture to the event, and from the
    // true end of speech (which includes the 500 ms of silence the endpointer waits for).
    let shift = offset as f64 / 16e3;
    let mut starts = clip.truth.iter().map(|t| t.0.as_secs_f64() + shift);
    let mut truths = clip.truth.iter();
    for e in &events {
        if let ListenEvent::Vad {
            event,
            decided,
            latency,
        } = e
        {
            match event {
                VadEvent::SpeechStarted { at } => {
                    let truth_start = starts.next().unwrap();
                    let total = decided.as_secs_f64() - truth_start + latency.as_secs_f64();
                    println!(
                        "SpeechStarted at {:.3}s: event {:.1} ms after its deciding sample, {:.0} ms after the true start of speech",
                        at.as_secs_f64(),
                        latency.as_secs_f64() * 1e3,
                        total * 1e3
                    )
                }
                VadEvent::SpeechEnded { at, .. } => {
                    let truth_end = truths.next().unwrap().1.as_secs_f64() + shift;
                    let total = decided.as_secs_f64() - truth_end + latency.as_secs_f64();
                    println!(
                        "SpeechEnded at {:.3}s: event {:.1} ms after its deciding sample, {:.0} ms after the true end of speech",
                        at.as_secs_f64(),
                        latency.as_secs_f64() * 1e3,
                        total * 1e3
                    );
                }
                VadEvent::SpeechPaused { .. } | VadEvent::SpeechResumed { .. } => {}
            }
        }
    }
}

#[test]
fn playback_arrives_intact_through_pulseaudio() {
    if !common::pulse_tests_enabled("playback_arrives_intact_through_pulseaudio") {
        return;
    }
    let _server = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    let dir = common::scratch_dir("pulse-playback");
    let (speech, rate) = common::espeak("The quick brown fox jumps over the lazy dog", &dir, "fox");
    let source = audio_io::resample::resample_clip(&speech, rate, OUTPUT_SAMPLE_RATE).unwrap();

    // Record the speaker's monitor as raw f32 at the source rate.
    let mut recorder = Command::new("parec")
        .args([
            "--latency-msec=200",
            "-d",
            "spk.monitor",
            "--format=float32le",
            "--channels=1",
            "--raw",
        ])
        .arg(format!("--rate={OUTPUT_SAMPLE_RATE}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("parec (pulseaudio-utils) is needed; `.ci/pulse.sh` installs it");
    let mut out = recorder.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = out.read_to_end(&mut bytes);
        bytes
    });
    let mut playback = DevicePlayback::open(&DeviceSelector::Default, OUTPUT_SAMPLE_RATE)
        .unwrap_or_else(|e| panic!("{e}"));
    println!("playback device format: {:?}", playback.device_format());
    // The speaker's monitor only delivers once the sink runs: let the stream play silence first.
    std::thread::sleep(Duration::from_millis(700));
    // 80 ms chunks, as the codec produces them, written faster than real time.
    let events = playback.device_events();
    for chunk in source.chunks(1920) {
        if let Err(e) = playback.write(chunk) {
            panic!(
                "{e}; device events: {:?}",
                events.try_iter().collect::<Vec<_>>()
            );
        }
    }
    playback.finish().unwrap();
    assert!(
        playback.wait_idle(Duration::from_secs(10)),
        "playback did not drain"
    );
    let stats = playback.stats();
    let played = playback.played();
    std::thread::sleep(Duration::from_millis(400));
    drop(playback);
    let _ = recorder.kill();
    let _ = recorder.wait();
    let bytes = reader.join().unwrap();
    let recorded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();

    println!(
        "playback stats: {stats:?}; played {played} of {} samples",
        source.len()
    );
    assert_eq!(stats.xruns, 0, "playback underran");
    assert!(
        played.abs_diff(source.len() as u64) <= 2,
        "played {played}, wrote {}",
        source.len()
    );

    let dump = dir.join("recorded.wav");
    write_wav(
        &dump,
        &recorded,
        audio_io::StreamFormat::new(OUTPUT_SAMPLE_RATE, 1),
    )
    .unwrap();
    println!("recorded audio: {}", dump.display());
    let (offset, correlation) = common::align(&source, &recorded, OUTPUT_SAMPLE_RATE);
    println!(
        "recorded {} samples; speech found at {offset}, correlation {correlation:.4}",
        recorded.len()
    );
    assert!(
        correlation > 0.95,
        "the speaker did not play what was written (correlation {correlation})"
    );
    // No dropout: every 50 ms block that has sound in the source (within 20 dB of its loudest
    // block; quieter ones are too sensitive to the sound server's resampling) has it in the
    // recording too.
    let block = (OUTPUT_SAMPLE_RATE / 20) as usize;
    let block_energy = |c: &[f32]| c.iter().map(|s| s * s).sum::<f32>();
    let loudest = source
        .chunks(block)
        .map(block_energy)
        .fold(0.0f32, f32::max);
    for (i, chunk) in source.chunks(block).enumerate() {
        let energy = block_energy(chunk);
        if energy < loudest * 0.01 {
            continue;
        }
        let start = offset + (i * block) as isize;
        let got: f32 = (0..chunk.len())
            .map(|k| {
                recorded
                    .get((start + k as isize) as usize)
                    .copied()
                    .unwrap_or(0.0)
            })
            .map(|s| s * s)
            .sum();
        let ratio = got / energy;
        assert!(
            (0.5..2.0).contains(&ratio),
            "block {i} ({} ms): energy ratio {ratio}",
            i * 50
        );
    }
}
