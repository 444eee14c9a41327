//! Decoding audio files: every WAV sample format, downmix, and bad input.

use std::path::Path;

use audio_io::decode::{read_mono, FileError};
use hound::{SampleFormat, WavSpec, WavWriter};

fn tone(n: usize, rate: u32) -> Vec<f32> {
    (0..n)
        .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate as f32).sin())
        .collect()
}

fn write(path: &Path, bits: u16, format: SampleFormat, channels: u16, rate: u32, samples: &[f32]) {
    let spec = WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: format,
    };
    let mut w = WavWriter::create(path, spec).unwrap();
    for &s in samples {
        for _ in 0..channels {
            match (format, bits) {
                (SampleFormat::Float, _) => w.write_sample(s).unwrap(),
                (SampleFormat::Int, 8) => w.write_sample((s * 127.0) as i8).unwrap(),
                (SampleFormat::Int, 16) => w.write_sample((s * 32767.0) as i16).unwrap(),
                (SampleFormat::Int, 24) => w.write_sample((s * 8_388_607.0) as i32).unwrap(),
                (SampleFormat::Int, _) => w.write_sample((s * 2_147_483_647.0) as i32).unwrap(),
            }
        }
    }
    w.finalize().unwrap();
}

#[test]
fn every_wav_sample_format_decodes_to_the_same_signal() {
    let dir = tempfile::tempdir().unwrap();
    let want = tone(4000, 24_000);
    for (bits, format, tol) in [
        (8, SampleFormat::Int, 2e-2),
        (16, SampleFormat::Int, 1e-4),
        (24, SampleFormat::Int, 1e-6),
        (32, SampleFormat::Int, 1e-6),
        (32, SampleFormat::Float, 0.0),
    ] {
        let path = dir.path().join(format!("t{bits}{format:?}.wav"));
        write(&path, bits, format, 1, 24_000, &want);
        let (got, rate) = read_mono(&path).unwrap();
        assert_eq!(rate, 24_000);
        assert_eq!(got.len(), want.len(), "{bits} bit {format:?}");
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= tol, "{bits} bit {format:?}: error {err}");
    }
}

#[test]
fn channels_are_averaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stereo.wav");
    let spec = WavSpec {
        channels: 2,
        sample_rate: 48_000,
        bits_per_sample: 32,
        sample_format: SampleFormat::Float,
    };
    let mut w = WavWriter::create(&path, spec).unwrap();
    for i in 0..1000 {
        w.write_sample(i as f32 / 1000.0).unwrap();
        w.write_sample(-0.5f32).unwrap();
    }
    w.finalize().unwrap();
    let (got, rate) = read_mono(&path).unwrap();
    assert_eq!((got.len(), rate), (1000, 48_000));
    assert!((got[600] - (0.6 - 0.5) / 2.0).abs() < 1e-6);
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(read_mono(&empty), Err(FileError::Empty { .. })));

    let text = dir.path().join("notes.wav");
    std::fs::write(
        &text,
        "this is not audio, just some text that happens to be long enough",
    )
    .unwrap();
    let err = read_mono(&text).unwrap_err().to_string();
    assert!(err.contains("not a readable audio file"), "{err}");

    let good = dir.path().join("good.wav");
    write(
        &good,
        16,
        SampleFormat::Int,
        1,
        16_000,
        &tone(16_000, 16_000),
    );
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut-header.wav");
    std::fs::write(&cut, &bytes[..20]).unwrap();
    let err = read_mono(&cut).unwrap_err().to_string();
    assert!(err.contains("not a readable audio file"), "{err}");

    // Cut in the middle of the data: the complete part is returned.
    let half = dir.path().join("cut-data.wav");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    let (got, _) = read_mono(&half).unwrap();
    assert!(got.len() > 4000 && got.len() < 16_000, "{}", got.len());

    let nan = dir.path().join("nan.wav");
    let mut samples = tone(1000, 16_000);
    samples[700] = f32::NAN;
    write(&nan, 32, SampleFormat::Float, 1, 16_000, &samples);
    match read_mono(&nan) {
        Err(FileError::NotFinite { index, .. }) => assert_eq!(index, 700),
        other => panic!("expected a non-finite sample error, got {other:?}"),
    }

    let missing = read_mono(Path::new("/no/such/file.wav"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("/no/such/file.wav"), "{missing}");
}
