//! The listener with echo handling, in real time without a sound server: a `MemoryCapture`
//! paced in real time plays a microphone signal that holds the assistant's echo (espeak-ng
//! speech through a small room, 70 ms late) and, 3 s into it, a user talking over it. The
//! assistant's audio is pushed to the `EchoReference` when the listener starts, as a daemon
//! that generates faster than real time does. About 8 s.
//!
//! The listener must send exactly one utterance, the user's: its `SpeechStarted` within a few
//! hundred milliseconds of the user's first word (the held utterance restarted there), and its
//! audio must hold the user's voice.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use audio_io::echo::{EchoCanceller, EchoConfig, EchoMode, EchoReference};
use audio_io::resample::resample_clip;
use audio_io::vad::VadEvent;
use audio_io::{
    read_wav, ListenEvent, Listener, ListenerConfig, MemoryCapture, Pacing, StreamFormat,
};

const FS: usize = 16_000;

fn espeak_16k(text: &str, voice: &str, dir: &Path, name: &str) -> Vec<f32> {
    let path = dir.join(format!("{name}.wav"));
    let status = Command::new("espeak-ng")
        .args(["-v", voice, "-s", "165", "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .expect("espeak-ng is needed for this test; `.ci/pulse.sh` installs it");
    assert!(status.success(), "espeak-ng failed");
    let (samples, format) = read_wav(&path).unwrap();
    resample_clip(&samples, format.sample_rate, FS as u32).unwrap()
}

#[test]
fn only_the_users_speech_comes_out_of_the_listener() {
    let dir = common::scratch_dir("echo-listener");
    let reply = espeak_16k(
        "Sure. The weather today is mostly sunny, with a high of twenty three degrees and a \
         light breeze from the west. Tomorrow looks cooler.",
        "en-us",
        &dir,
        "reply",
    );
    let user = espeak_16k(
        "Stop. Tell me about dinner",
        "en-gb-scotland+f3",
        &dir,
        "user",
    );

    // The reference: 0.5 s of silence, then the reply. The microphone: the same, 70 ms later,
    // through a direct path and two reflections, at half the level; the user 3 s into the
    // reply; 1.5 s of silence at the end.
    let lead = FS / 2;
    let delay = 1120;
    let mut reference = vec![0.0f32; lead];
    reference.extend_from_slice(&reply);
    let total = lead + reply.len() + FS * 3 / 2;
    let mut mic = vec![0.0f32; total];
    for (k, gain) in [(0usize, 0.5f32), (45, -0.2), (300, 0.1)] {
        for (q, r) in reference.iter().enumerate() {
            if let Some(m) = mic.get_mut(q + delay + k) {
                *m += gain * r;
            }
        }
    }
    let user_at = lead + 3 * FS;
    for (m, u) in mic[user_at..].iter_mut().zip(&user) {
        *m += 0.5 * u;
    }
    let user_end = user_at + user.len();

    let echo_reference = EchoReference::new(FS as u32).unwrap();
    let canceller = EchoCanceller::new(
        EchoConfig {
            mode: EchoMode::Cancel,
            ..EchoConfig::default()
        },
        echo_reference.clone(),
    );
    let status = canceller.status();
    let capture =
        MemoryCapture::new(mic, StreamFormat::new(FS as u32, 1), Pacing::RealTime).unwrap();
    let listener = Listener::start_with_echo(
        Box::new(capture),
        common::load_vad(),
        ListenerConfig::default(),
        canceller,
    )
    .unwrap();
    // The pump starts reading at once; the reference starts playing now.
    echo_reference.push(&reference, 0);
    echo_reference.finish();

    let mut events = Vec::new();
    loop {
        match listener.events().recv_timeout(Duration::from_secs(30)) {
            Ok(ListenEvent::Stopped { error, .. }) => {
                assert_eq!(error, None);
                break;
            }
            Ok(e) => events.push(e),
            Err(e) => panic!("listener stuck: {e}"),
        }
    }
    let stats = status.snapshot();
    println!("{stats:?}");
    let vad: Vec<&VadEvent> = events
        .iter()
        .filter_map(|e| match e {
            ListenEvent::Vad { event, .. } => Some(event),
            _ => None,
        })
        .collect();
    println!(
        "user {:.3}-{:.3} s; events: {:?}",
        user_at as f64 / 16e3,
        user_end as f64 / 16e3,
        vad.iter()
            .map(|e| match e {
                VadEvent::SpeechStarted { at } => format!("start {:.3}", at.as_secs_f64()),
                VadEvent::SpeechEnded { started, at, .. } => format!(
                    "end {:.3} (started {:.3})",
                    at.as_secs_f64(),
                    started.as_secs_f64()
                ),
                VadEvent::SpeechPaused { at, .. } => format!("pause {:.3}", at.as_secs_f64()),
                VadEvent::SpeechResumed { at } => format!("resume {:.3}", at.as_secs_f64()),
            })
            .collect::<Vec<_>>()
    );
    let utterances = common::utterances(&events);
    assert_eq!(
        utterances.len(),
        1,
        "expected the user's utterance only: {utterances:?}"
    );
    let (started, ended, audio_start, len) = utterances[0];
    let user_start = user_at as f64 / 16e3;
    let started = started.as_secs_f64();
    assert!(
        (started - user_start).abs() < 0.35,
        "the utterance starts at {started:.3} s, the user at {user_start:.3} s"
    );
    assert!(ended.as_secs_f64() >= user_end as f64 / 16e3 - 0.3);
    assert_eq!(
        len,
        ((ended - audio_start).as_secs_f64() * 16_000.0).round() as usize
    );
    assert!(stats.delay_ms.is_some());
}
