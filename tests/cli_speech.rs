//! `lfm2d chat` and `lfm2d speak` as a user runs them, on the fixture models: the frames they
//! emit are the reference's, and the WAV files hold exactly the decoded frames.

mod common;

use common::{fixtures, lfm2d};

/// The reference's (text ids, frames) of a speech recording.
fn reference(model: &str, recording: &str) -> (Vec<u64>, Vec<Vec<u64>>) {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures()
                .join(model)
                .join("speech")
                .join(format!("{recording}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let mut text = Vec::new();
    let mut frames = Vec::new();
    for item in meta["generate"]["items"].as_array().unwrap() {
        if let Some(t) = item.get("text") {
            text.push(t.as_u64().unwrap());
        } else {
            frames.push(
                item["audio"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_u64().unwrap())
                    .collect(),
            );
        }
    }
    (text, frames)
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = lfm2d(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn frames(v: &serde_json::Value) -> Vec<Vec<u64>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

/// Checks the WAV: 24 kHz mono, `1920` samples per decodable frame.
fn check_wav(path: &std::path::Path, json: &serde_json::Value) {
    let r = hound::WavReader::open(path).unwrap();
    assert_eq!((r.spec().sample_rate, r.spec().channels), (24_000, 1));
    let decodable = frames(&json["frames"])
        .iter()
        .filter(|f| !f.contains(&2048))
        .count() as u64;
    assert_eq!(json["samples"].as_u64().unwrap(), decodable * 1920);
    assert_eq!(r.duration() as u64, decodable * 1920);
}

#[test]
fn chat_reproduces_the_reference_interleaved_reply() {
    let tmp = tempfile::tempdir().unwrap();
    for (model, codec) in [("tiny-c", "lfm2"), ("tiny-c", "mimi")] {
        let out = tmp.path().join(format!("{model}-{codec}.wav"));
        let input = fixtures().join("audio/what_time_16k.wav");
        let dir = fixtures().join(model).join("model");
        let json = run_json(&[
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--greedy",
            "--max-new-tokens",
            "60",
            "--codec",
            codec,
            "--json",
        ]);
        let (want_text, want_frames) = reference(model, "s2s_interleaved");
        assert_eq!(ids(&json["text_ids"]), want_text, "{model}");
        assert_eq!(frames(&json["frames"]), want_frames, "{model}");
        check_wav(&out, &json);
    }
}

#[test]
fn speak_reproduces_the_reference_tts_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tts.wav");
    let dir = fixtures().join("tiny-c/model");
    let json = run_json(&[
        "speak",
        "--model",
        dir.to_str().unwrap(),
        "--voice",
        "us-male",
        "Hello! The weather is sunny today.",
        "--out",
        out.to_str().unwrap(),
        "--greedy",
        "--max-new-tokens",
        "60",
        "--json",
    ]);
    let (want_text, want_frames) = reference("tiny-c", "tts_sequential");
    assert_eq!(ids(&json["text_ids"]), want_text);
    assert_eq!(frames(&json["frames"]), want_frames);
    assert!(want_frames.len() > 10, "the recording speaks");
    check_wav(&out, &json);
}

#[test]
fn sampled_speech_is_reproducible_and_streams_text() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("tiny-c/model");
    let input = fixtures().join("audio/hi_16k.wav");
    let run = |seed: &str, out: &str| {
        let out = tmp.path().join(out);
        let o = lfm2d(&[
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "40",
            "--seed",
            seed,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8(o.stdout).unwrap(),
            std::fs::read(out).unwrap(),
        )
    };
    let (text_a, wav_a) = run("5", "a.wav");
    let (text_b, wav_b) = run("5", "b.wav");
    assert_eq!((text_a.clone(), wav_a.clone()), (text_b, wav_b));
    assert!(!text_a.trim().is_empty());
    let (_, wav_c) = run("6", "c.wav");
    assert_ne!(wav_a, wav_c, "another seed samples other audio");
}

#[test]
fn speech_errors_are_clear() {
    let dir = fixtures().join("tiny-a/model");
    // tiny-a has neither audio_detokenizer/ nor Mimi weights.
    let out = lfm2d(&[
        "speak",
        "--model",
        dir.to_str().unwrap(),
        "hello",
        "--out",
        "/tmp/never.wav",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("audio decoder") || err.contains("audio_detokenizer"),
        "{err}"
    );

    let out = lfm2d(&[
        "speak",
        "--model",
        dir.to_str().unwrap(),
        "hello",
        "--voice",
        "robot",
        "--out",
        "/tmp/never.wav",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("known voices: us-male, us-female, uk-male, uk-female"));

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("q.wav");
    std::fs::write(&bad, b"not a sound").unwrap();
    let c = fixtures().join("tiny-c/model");
    let out = lfm2d(&[
        "chat",
        "--model",
        c.to_str().unwrap(),
        "--input",
        bad.to_str().unwrap(),
        "--out",
        "/tmp/never.wav",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a readable audio file"));
}
