//! Shared by the integration tests: real speech from espeak-ng with known pauses, its true
//! speech boundaries, and the checks on what the listener found.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use audio_io::vad::{SileroVad, VadAssets, VadEvent};
use audio_io::{read_wav, ListenEvent, StreamFormat};

/// Loads the Silero VAD, or fails with the message that says how to get it.
pub fn load_vad() -> SileroVad {
    let assets = VadAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    SileroVad::load(&assets).unwrap_or_else(|e| panic!("{e}"))
}

/// How far a detected boundary may be from the truth.
pub const TOLERANCE: Duration = Duration::from_millis(100);

pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("audio-io-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Speaks `text` with espeak-ng into a WAV file and returns its mono samples and rate.
pub fn espeak(text: &str, dir: &Path, name: &str) -> (Vec<f32>, u32) {
    let path = dir.join(format!("{name}.wav"));
    let status = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "160", "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .unwrap_or_else(|e| {
            panic!("espeak-ng is needed for this test ({e}); `.ci/pulse.sh` or `apt-get install espeak-ng` installs it")
        });
    assert!(status.success(), "espeak-ng failed");
    let (samples, format) = read_wav(&path).unwrap();
    assert_eq!(format.channels, 1);
    (samples, format.sample_rate)
}

/// A clip of several phrases separated by pauses, and where speech really is in it.
pub struct SpeechClip {
    pub samples: Vec<f32>,
    pub rate: u32,
    /// True (start, end) of each phrase, from the clip's start.
    pub truth: Vec<(Duration, Duration)>,
}

impl SpeechClip {
    pub fn format(&self) -> StreamFormat {
        StreamFormat::new(self.rate, 1)
    }
}

/// Where the speech in one espeak clip begins and ends: the first and last 10 ms frame whose
/// RMS is within 30 dB of the loudest frame.
fn speech_extent(samples: &[f32], rate: u32) -> (usize, usize) {
    let frame = rate as usize / 100;
    let rms: Vec<f32> = samples
        .chunks(frame)
        .map(|c| (c.iter().map(|s| s * s).sum::<f32>() / c.len() as f32).sqrt())
        .collect();
    let loudest = rms.iter().fold(0.0f32, |m, &v| m.max(v));
    let floor = loudest * 10f32.powf(-40.0 / 20.0);
    let first = rms.iter().position(|&v| v > floor).unwrap();
    let last = rms.iter().rposition(|&v| v > floor).unwrap();
    (first * frame, ((last + 1) * frame).min(samples.len()))
}

/// Three spoken phrases: 1 s of silence first, 1.2 s pauses between, 1.5 s of silence after.
pub fn speech_with_pauses(dir: &Path) -> SpeechClip {
    let phrases = [
        "Hello there. What is the weather like today",
        "Please turn on the lights in the kitchen",
        "Thank you very much",
    ];
    let mut samples = Vec::new();
    let mut truth = Vec::new();
    let mut rate = 0;
    let secs = |s: f32, rate: u32| (s * rate as f32) as usize;
    for (i, text) in phrases.iter().enumerate() {
        let (speech, r) = espeak(text, dir, &format!("phrase{i}"));
        rate = r;
        let gap = if i == 0 { 1.0 } else { 1.2 };
        samples.extend(std::iter::repeat_n(0.0, secs(gap, rate)));
        let (first, last) = speech_extent(&speech, rate);
        let offset = samples.len();
        truth.push((
            audio_io::frames_to_duration((offset + first) as u64, rate),
            audio_io::frames_to_duration((offset + last) as u64, rate),
        ));
        samples.extend_from_slice(&speech);
    }
    samples.extend(std::iter::repeat_n(0.0, secs(1.5, rate)));
    SpeechClip {
        samples,
        rate,
        truth,
    }
}

/// Utterances (started, ended, event) the listener reported, checked for consistency.
pub fn utterances(events: &[ListenEvent]) -> Vec<(Duration, Duration, Duration, usize)> {
    let mut open = None;
    let mut found = Vec::new();
    for event in events {
        match event {
            ListenEvent::Vad {
                event: VadEvent::SpeechStarted { at },
                ..
            } => {
                assert!(open.is_none(), "two starts in a row: {events:?}");
                open = Some(*at);
            }
            ListenEvent::Vad {
                event:
                    VadEvent::SpeechEnded {
                        started,
                        at,
                        audio_start,
                        audio,
                    },
                ..
            } => {
                assert_eq!(open.take(), Some(*started), "end without its start");
                found.push((*started, *at, *audio_start, audio.len()));
            }
            _ => {}
        }
    }
    found
}

fn diff(a: Duration, b: Duration) -> Duration {
    a.abs_diff(b)
}

/// Checks one utterance per phrase, each boundary within [`TOLERANCE`] of the truth once
/// shifted by `offset` (truth time + offset = stream time), and the pre-roll.
pub fn check_boundaries(
    found: &[(Duration, Duration, Duration, usize)],
    truth: &[(Duration, Duration)],
    offset: f64,
) {
    let shift = |d: Duration| Duration::from_secs_f64((d.as_secs_f64() + offset).max(0.0));
    let report: Vec<String> = found
        .iter()
        .zip(truth)
        .map(|((s, e, _, _), (ts, te))| {
            format!(
                "start {:.3}s (truth {:.3}s, {:+.0} ms), end {:.3}s (truth {:.3}s, {:+.0} ms)",
                s.as_secs_f64(),
                shift(*ts).as_secs_f64(),
                (s.as_secs_f64() - shift(*ts).as_secs_f64()) * 1e3,
                e.as_secs_f64(),
                shift(*te).as_secs_f64(),
                (e.as_secs_f64() - shift(*te).as_secs_f64()) * 1e3,
            )
        })
        .collect();
    println!("utterances:\n  {}", report.join("\n  "));
    assert_eq!(
        found.len(),
        truth.len(),
        "expected one utterance per phrase, found {found:?}"
    );
    for ((start, end, audio_start, audio_len), (ts, te)) in found.iter().zip(truth) {
        assert!(
            diff(*start, shift(*ts)) <= TOLERANCE,
            "start {start:?} vs truth {:?}",
            shift(*ts)
        );
        assert!(
            diff(*end, shift(*te)) <= TOLERANCE,
            "end {end:?} vs truth {:?}",
            shift(*te)
        );
        // 300 ms of pre-roll, and the audio covers exactly audio_start..end.
        assert_eq!(*start - *audio_start, Duration::from_millis(300));
        let expected = ((*end - *audio_start).as_secs_f64() * 16_000.0).round() as usize;
        assert_eq!(*audio_len, expected);
    }
}

/// Finds where `reference` occurs in `recorded`: returns the offset (recorded index of
/// reference[0]) and the normalized correlation there. A coarse search on 10 ms RMS envelopes
/// finds the region; a sample-exact search around it finds the lag.
pub fn align(reference: &[f32], recorded: &[f32], rate: u32) -> (isize, f32) {
    let frame = (rate / 100) as usize;
    let envelope = |x: &[f32]| -> Vec<f32> {
        x.chunks(frame)
            .map(|c| (c.iter().map(|s| s * s).sum::<f32>() / c.len() as f32).sqrt())
            .collect()
    };
    let (er, ec) = (envelope(reference), envelope(recorded));
    assert!(
        ec.len() >= er.len(),
        "recording shorter than the reference: {} < {}",
        recorded.len(),
        reference.len()
    );
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let mr = mean(&er);
    let coarse = (0..=ec.len() - er.len())
        .map(|lag| {
            let window = &ec[lag..lag + er.len()];
            let mw = mean(window);
            let dot: f32 = er
                .iter()
                .zip(window)
                .map(|(a, b)| (a - mr) * (b - mw))
                .sum();
            (lag, dot)
        })
        .fold(
            (0, f32::MIN),
            |best, cur| if cur.1 > best.1 { cur } else { best },
        )
        .0 as isize;
    let correlation_at = |offset: isize| -> f32 {
        let (mut dot, mut ea, mut eb) = (0.0f64, 0.0f64, 0.0f64);
        for (i, &a) in reference.iter().enumerate() {
            let j = offset + i as isize;
            let b = if j >= 0 && (j as usize) < recorded.len() {
                recorded[j as usize]
            } else {
                0.0
            };
            dot += f64::from(a) * f64::from(b);
            ea += f64::from(a) * f64::from(a);
            eb += f64::from(b) * f64::from(b);
        }
        (dot / (ea.sqrt() * eb.sqrt()).max(1e-12)) as f32
    };
    let center = coarse * frame as isize;
    let span = 2 * frame as isize;
    (center - span..=center + span)
        .map(|offset| (offset, correlation_at(offset)))
        .fold(
            (0, f32::MIN),
            |best, cur| if cur.1 > best.1 { cur } else { best },
        )
}

/// True when the pulse tests were asked for; otherwise says loudly that they are skipped.
pub fn pulse_tests_enabled(test: &str) -> bool {
    if std::env::var_os("LFM2D_PULSE_TESTS").is_some() {
        return true;
    }
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing tests.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: set LFM2D_PULSE_TESTS=1 after `. .ci/pulse.sh` (a private \
         PulseAudio server with a virtual mic and speaker) to run it through a real device path ***"
    );
    false
}
