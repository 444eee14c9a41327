//! `lfm2d transcribe` as a user runs it.

mod common;

use common::{fixtures, lfm2d};
use std::path::{Path, PathBuf};

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Reference greedy ASR text ids of a clip, up to <|im_end|> or <|audio_start|>.
fn reference_ids(model: &str, clip: &str) -> Vec<u64> {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures()
                .join(model)
                .join("asr")
                .join(format!("{clip}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    meta["generate"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map_while(|i| i.get("text").and_then(|t| t.as_u64()))
        .take_while(|&id| id != 7 && id != 128)
        .collect()
}

#[test]
fn transcripts_are_the_reference_greedy_asr() {
    for (model, clip, ext) in [
        ("tiny-a", "what_time_16k", "wav"),
        ("tiny-c", "hi_16k", "wav"),
        ("tiny-b", "hi_44k1", "wav"),
        ("tiny-a", "hi_stereo_24k", "wav"),
    ] {
        let file = fixtures().join("audio").join(format!("{clip}.{ext}"));
        let dir = fixtures().join(model).join("model");
        let out = lfm2d(&[
            "transcribe",
            "--model",
            dir.to_str().unwrap(),
            "--json",
            file.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = json_lines(&out.stdout);
        assert_eq!(lines.len(), 1);
        let ids: Vec<u64> = lines[0]["text_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let want = reference_ids(model, clip);
        // The CLI stops at <|im_end|> / <|audio_start|>, or after --max-new-tokens (512).
        assert_eq!(
            &ids[..want.len().min(ids.len())],
            &want[..],
            "{model}/{clip}"
        );
        assert!(ids.len() >= want.len(), "{model}/{clip}");
    }
}

/// A recording of several minutes: speech clips with pauses, concatenated.
fn long_recording(dir: &Path, minutes: f32) -> PathBuf {
    let mut speech = Vec::new();
    for clip in ["what_time_16k", "fox_16k", "hi_16k"] {
        let mut r =
            hound::WavReader::open(fixtures().join("audio").join(format!("{clip}.wav"))).unwrap();
        speech.extend(r.samples::<i16>().map(|s| s.unwrap()));
        speech.extend(std::iter::repeat_n(0i16, 8000));
    }
    let path = dir.join("long.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    let total = (minutes * 60.0 * 16_000.0) as usize;
    for i in 0..total {
        w.write_sample(speech[i % speech.len()]).unwrap();
    }
    w.finalize().unwrap();
    path
}

#[test]
fn a_long_recording_is_split_at_silences_and_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let file = long_recording(tmp.path(), 3.0);
    let dir = fixtures().join("tiny-a/model");
    let out = lfm2d(&[
        "transcribe",
        "--model",
        dir.to_str().unwrap(),
        "--json",
        "--max-new-tokens",
        "8",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = &json_lines(&out.stdout)[0];
    let segments = result["segments"].as_array().unwrap();
    assert!(
        segments.len() >= 6,
        "{} segments for 3 minutes",
        segments.len()
    );
    let mut at = 0.0;
    for s in segments {
        let (start, end) = (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap());
        assert!(
            (start - at).abs() < 1e-6,
            "segments must tile the recording"
        );
        assert!(end - start <= 30.0 + 1e-6 && end > start);
        assert!(!s["text_ids"].as_array().unwrap().is_empty());
        at = end;
    }
    assert!((at - 180.0).abs() < 0.01, "covered {at} s");
    // Cuts fall in the pauses: the 0.5 s silences between clips.
    assert!(segments
        .iter()
        .take(segments.len() - 1)
        .all(|s| s["end"].as_f64().unwrap() - s["start"].as_f64().unwrap() > 20.0));
}

#[test]
fn bad_files_are_reported_and_the_others_still_transcribed() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("notes.wav");
    std::fs::write(&text, "definitely not audio data, only words in a file").unwrap();
    let empty = tmp.path().join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    let good = fixtures().join("audio/hi_16k.wav");
    let short = fixtures().join("audio/cut_159_16k.wav");
    let dir = fixtures().join("tiny-a/model");
    let out = lfm2d(&[
        "transcribe",
        "--model",
        dir.to_str().unwrap(),
        "--json",
        "--max-new-tokens",
        "4",
        text.to_str().unwrap(),
        empty.to_str().unwrap(),
        short.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("notes.wav: not a readable audio file"),
        "{err}"
    );
    assert!(err.contains("empty.wav: the file is empty"), "{err}");
    assert!(
        err.contains("cut_159_16k.wav: the recording is 10 ms long"),
        "{err}"
    );
    assert!(
        err.contains("3 of 4 files could not be transcribed"),
        "{err}"
    );
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 1);
    assert!(lines[0]["file"].as_str().unwrap().ends_with("hi_16k.wav"));
}

#[test]
fn silence_is_transcribed_without_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("silence.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for _ in 0..16_000 {
        w.write_sample(0i16).unwrap();
    }
    w.finalize().unwrap();
    let dir = fixtures().join("tiny-a/model");
    let out = lfm2d(&[
        "transcribe",
        "--model",
        dir.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
