//! A device that vanishes is reopened: the private PulseAudio server (`.ci/pulse.sh`) is killed
//! and started again under a running capture and playback. Skipped, loudly, unless
//! LFM2D_PULSE_TESTS is set. A process of its own: the dead streams leave libpulse threads
//! behind that disturb later streams in the same process.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use audio_io::{
    DeviceCapture, DevicePlayback, DeviceSelector, ListenEvent, Listener, ListenerConfig, Playback,
};
use lfm2_audio::format::OUTPUT_SAMPLE_RATE;

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
    let capture = DeviceCapture::open(&DeviceSelector::Default).unwrap_or_else(|e| panic!("{e}"));
    let config = ListenerConfig {
        tap_audio: true,
        ..ListenerConfig::default()
    };
    let listener = Listener::start(Box::new(capture), common::load_vad(), config).unwrap();
    let mut playback = DevicePlayback::open(&DeviceSelector::Default, OUTPUT_SAMPLE_RATE)
        .unwrap_or_else(|e| panic!("{e}"));
    let device_events = playback.device_events();
    let tone: Vec<f32> = (0..OUTPUT_SAMPLE_RATE as usize / 2)
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
