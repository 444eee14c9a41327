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

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use audio_io::vad::{SileroVad, VadAssets, VadEvent};
use audio_io::{
    write_wav, DeviceCapture, DevicePlayback, DeviceSelector, ListenEvent, Listener,
    ListenerConfig, Playback, PLAYBACK_SOURCE_RATE,
};

/// The two tests share one sound server; run them one at a time.
static SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pactl(args: &[&str]) {
    let status = Command::new("pactl")
        .args(args)
        .status()
        .expect("pactl (pulseaudio-utils) is needed; `.ci/pulse.sh` installs it");
    assert!(status.success(), "pactl {args:?} failed");
}

fn vad() -> SileroVad {
    let assets = VadAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    SileroVad::load(&assets).unwrap_or_else(|e| panic!("{e}"))
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
    let listener = Listener::start(Box::new(capture), vad(), config).unwrap();

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
    let mut truths = clip.truth.iter();
    for e in &events {
        if let ListenEvent::Vad { event, latency } = e {
            match event {
                VadEvent::SpeechStarted { at } => {
                    println!(
                        "SpeechStarted at {:.3}s: event {:.1} ms after its deciding sample",
                        at.as_secs_f64(),
                        latency.as_secs_f64() * 1e3
                    )
                }
                VadEvent::SpeechEnded { at, .. } => {
                    let truth_end = truths.next().unwrap().1.as_secs_f64() + offset as f64 / 16e3;
                    let hold = VadEvent::hold_after_end(&ListenerConfig::default().vad);
                    let total =
                        at.as_secs_f64() - truth_end + hold.as_secs_f64() + latency.as_secs_f64();
                    println!(
                        "SpeechEnded at {:.3}s: event {:.1} ms after its deciding sample, {:.0} ms after the true end of speech",
                        at.as_secs_f64(),
                        latency.as_secs_f64() * 1e3,
                        total * 1e3
                    );
                }
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
    let source = audio_io::resample::resample_clip(&speech, rate, PLAYBACK_SOURCE_RATE).unwrap();

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
        .arg(format!("--rate={PLAYBACK_SOURCE_RATE}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("parec (pulseaudio-utils) is needed; `.ci/pulse.sh` installs it");
    let mut out = recorder.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = out.read_to_end(&mut bytes);
        bytes
    });
    let mut playback = DevicePlayback::open(&DeviceSelector::Default, PLAYBACK_SOURCE_RATE)
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
        audio_io::StreamFormat::new(PLAYBACK_SOURCE_RATE, 1),
    )
    .unwrap();
    println!("recorded audio: {}", dump.display());
    let (offset, correlation) = common::align(&source, &recorded, PLAYBACK_SOURCE_RATE);
    println!(
        "recorded {} samples; speech found at {offset}, correlation {correlation:.4}",
        recorded.len()
    );
    assert!(
        correlation > 0.95,
        "the speaker did not play what was written (correlation {correlation})"
    );
    // No dropout: every 50 ms block that has sound in the source has it in the recording too.
    let block = (PLAYBACK_SOURCE_RATE / 20) as usize;
    for (i, chunk) in source.chunks(block).enumerate() {
        let energy: f32 = chunk.iter().map(|s| s * s).sum();
        if energy < 1e-3 {
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

/// Kills the private PulseAudio server and starts it again with `.ci/pulse.sh`: to cpal, the
/// default devices vanish and come back.
fn restart_server() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
    let dir =
        std::env::var("LFM2D_PULSE_DIR").unwrap_or_else(|_| format!("/tmp/lfm2d-pulse-{uid}"));
    let pid = std::fs::read_to_string(format!("{dir}/pid"))
        .unwrap_or_else(|e| panic!("{dir}/pid: {e}; was the server started by .ci/pulse.sh?"));
    let status = Command::new("kill").arg(pid.trim()).status().unwrap();
    assert!(status.success(), "kill {pid}");
    std::thread::sleep(Duration::from_millis(1500));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/pulse.sh");
    let status = Command::new("bash")
        .arg(&script)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());
}

#[test]
fn devices_are_reopened_after_the_sound_server_restarts() {
    if !common::pulse_tests_enabled("devices_are_reopened_after_the_sound_server_restarts") {
        return;
    }
    let _server = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    let capture = DeviceCapture::open(&DeviceSelector::Default).unwrap_or_else(|e| panic!("{e}"));
    let config = ListenerConfig {
        tap_audio: true,
        ..ListenerConfig::default()
    };
    let listener = Listener::start(Box::new(capture), vad(), config).unwrap();
    let mut playback = DevicePlayback::open(&DeviceSelector::Default, PLAYBACK_SOURCE_RATE)
        .unwrap_or_else(|e| panic!("{e}"));
    let device_events = playback.device_events();
    let tone: Vec<f32> = (0..PLAYBACK_SOURCE_RATE as usize / 2)
        .map(|i| (i as f32 * 0.05).sin() * 0.3)
        .collect();
    playback.write(&tone).unwrap();
    playback.finish().unwrap();
    assert!(playback.wait_idle(Duration::from_secs(5)));

    let wait_for = |what: &str, pred: &dyn Fn(&ListenEvent) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match listener.events().recv_timeout(left) {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(_) => panic!("no {what} within 20 s"),
            }
        }
    };
    wait_for("audio", &|e| matches!(e, ListenEvent::Audio { .. }));

    restart_server();

    let lost = wait_for("capture device loss", &|e| {
        matches!(e, ListenEvent::Device(audio_io::DeviceEvent::Lost { .. }))
    });
    println!("capture: {lost:?}");
    let reopened = wait_for("capture reopen", &|e| {
        matches!(
            e,
            ListenEvent::Device(audio_io::DeviceEvent::Reopened { .. })
        )
    });
    println!("capture: {reopened:?}");
    wait_for("audio after the reopen", &|e| {
        matches!(e, ListenEvent::Audio { .. })
    });

    // The playback stream died with the server; the next write notices (its callbacks stopped)
    // and reopens.
    let played_before = playback.played();
    playback
        .write(&tone)
        .unwrap_or_else(|e| panic!("write after the restart: {e}"));
    playback.finish().unwrap();
    assert!(
        playback.wait_idle(Duration::from_secs(10)),
        "playback did not drain after the reopen"
    );
    let events: Vec<_> = device_events.try_iter().collect();
    println!("playback: {events:?}");
    assert!(
        matches!(events.first(), Some(audio_io::DeviceEvent::Lost { .. })),
        "{events:?}"
    );
    assert!(
        matches!(events.last(), Some(audio_io::DeviceEvent::Reopened { .. })),
        "{events:?}"
    );
    assert!(
        playback.played() >= played_before + tone.len() as u64 - 2,
        "the tone was not played after the reopen: {} -> {}",
        played_before,
        playback.played()
    );
    listener.stop();
}
