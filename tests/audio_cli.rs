//! `lfm2d devices` and `lfm2d listen` as a user runs them. The listen tests need the VAD assets
//! (`tools/fetch_vad.sh`) and espeak-ng + sox (`.ci/pulse.sh` installs them); the one on the
//! virtual microphone runs only with LFM2D_PULSE_TESTS set (after `. .ci/pulse.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lfm2d(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lfm2d"));
    cmd.args(args);
    cmd
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lfm2d-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One spoken phrase with a second of silence before and after.
fn speech_file(dir: &Path) -> PathBuf {
    let raw = dir.join("raw.wav");
    let padded = dir.join("speech.wav");
    let status = Command::new("espeak-ng")
        .args(["-v", "en-us", "-w"])
        .arg(&raw)
        .arg("Please turn on the lights in the kitchen")
        .status()
        .expect("espeak-ng is needed (`.ci/pulse.sh` installs it)");
    assert!(status.success());
    let status = Command::new("sox")
        .arg(&raw)
        .arg(&padded)
        .args(["pad", "1", "1"])
        .status()
        .expect("sox is needed (`.ci/pulse.sh` installs it)");
    assert!(status.success());
    padded
}

#[test]
fn devices_lists_inputs_and_outputs() {
    let output = lfm2d(&["devices"]).output().unwrap();
    let (stdout, stderr) = text(&output);
    assert!(stdout.contains("Input devices"), "{stdout}\n{stderr}");
    assert!(stdout.contains("Output devices"), "{stdout}\n{stderr}");
    if output.status.success() {
        assert!(stdout.contains("#0"), "{stdout}");
    } else {
        assert!(stderr.contains("no audio devices found"), "{stderr}");
    }
}

#[test]
fn listen_to_a_file_records_the_utterance() {
    let dir = scratch("file");
    let wav = speech_file(&dir);
    let record = dir.join("utterances");
    let output = lfm2d(&[
        "listen",
        "--file",
        wav.to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("speech started"), "{stdout}");
    assert!(stdout.contains("speech ended"), "{stdout}");
    assert!(stdout.contains("stopped: 1 utterance(s)"), "{stdout}");
    let saved = record.join("utterance-0001.wav");
    let (samples, format) = audio_io::read_wav(&saved).unwrap();
    assert_eq!(format, audio_io::StreamFormat::new(16_000, 1));
    // The phrase is about 2.5 s, plus 300 ms of pre-roll.
    let secs = samples.len() as f64 / 16_000.0;
    assert!((2.0..3.5).contains(&secs), "utterance of {secs} s");
}

#[test]
fn listen_says_what_is_missing() {
    let output = lfm2d(&["listen", "--seconds", "1"])
        .env("LFM2D_VAD_MODEL", "/nonexistent/silero_vad.onnx")
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("LFM2D_VAD_MODEL=/nonexistent/silero_vad.onnx does not exist"),
        "{stderr}"
    );
    assert!(stderr.contains("tools/fetch_vad.sh"), "{stderr}");

    let output = lfm2d(&["listen", "--threshold", "1.5"]).output().unwrap();
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("threshold must be between 0 and 1"),
        "{stderr}"
    );

    let output = lfm2d(&["listen", "--device", "no-such-microphone", "--seconds", "1"])
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("no input device matches \"no-such-microphone\"")
            || stderr.contains("no audio input device"),
        "{stderr}"
    );
}

#[test]
fn listen_on_the_virtual_microphone() {
    if std::env::var_os("LFM2D_PULSE_TESTS").is_none() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED listen_on_the_virtual_microphone: set LFM2D_PULSE_TESTS=1 after `. .ci/pulse.sh` ***"
        );
        return;
    }
    let dir = scratch("mic");
    let wav = speech_file(&dir);
    let name = format!("lfm2d-cli-{}", std::process::id());
    let pactl = |args: &[&str]| {
        let status = Command::new("pactl").args(args).status().unwrap();
        assert!(status.success(), "pactl {args:?}");
    };
    pactl(&["upload-sample", wav.to_str().unwrap(), &name]);
    let listen = lfm2d(&["listen", "--device", "default", "--seconds", "7"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Past the cold start of the capture stream.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    pactl(&["play-sample", &name, "mic"]);
    let output = listen.wait_with_output().unwrap();
    pactl(&["remove-sample", &name]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("listening on \"default\""), "{stdout}");
    assert!(stdout.contains("speech started"), "{stdout}");
    assert!(stdout.contains("stopped: 1 utterance(s)"), "{stdout}");
    assert!(stdout.contains("0 ring overflow(s)"), "{stdout}");
}
