//! WAV files as capture sources and playback sinks (hound).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::memory::PacedSink;
use crate::{
    AudioError, Capture, MemoryCapture, Pacing, Playback, ReadOutcome, StreamFormat, StreamStats,
};

/// Reads a whole WAV file (PCM 8/16/24/32-bit or 32-bit float, any rate and channel count) as
/// interleaved `f32` in [-1, 1]. A malformed or truncated file is an error, never a panic.
pub fn read_wav(path: &Path) -> Result<(Vec<f32>, StreamFormat), AudioError> {
    let reader = hound::WavReader::open(path).map_err(|e| AudioError::file(path, e))?;
    let spec = reader.spec();
    let format = StreamFormat::new(spec.sample_rate, spec.channels)
        .validate()
        .map_err(|e| AudioError::file(path, e))?;
    if !(crate::decode::MIN_RATE..=crate::decode::MAX_RATE).contains(&spec.sample_rate) {
        return Err(AudioError::file(
            path,
            format!(
                "sample rate {} Hz is not supported (expected {} to {} Hz)",
                spec.sample_rate,
                crate::decode::MIN_RATE,
                crate::decode::MAX_RATE
            ),
        ));
    }
    let samples: Result<Vec<f32>, hound::Error> = match spec.sample_format {
        hound::SampleFormat::Float if spec.bits_per_sample == 32 => {
            reader.into_samples::<f32>().collect()
        }
        hound::SampleFormat::Int if (1..=32).contains(&spec.bits_per_sample) => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|s| s as f32 * scale))
                .collect()
        }
        _ => {
            return Err(AudioError::file(
                path,
                format!(
                    "unsupported WAV sample format: {:?} {} bit",
                    spec.sample_format, spec.bits_per_sample
                ),
            ))
        }
    };
    let samples = samples.map_err(|e| AudioError::file(path, e))?;
    Ok((samples, format))
}

/// Writes interleaved `f32` samples as a 16-bit PCM WAV file (clipped to [-1, 1]).
pub fn write_wav(path: &Path, samples: &[f32], format: StreamFormat) -> Result<(), AudioError> {
    let spec = hound::WavSpec {
        channels: format.channels,
        sample_rate: format.sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).map_err(|e| AudioError::file(path, e))?;
    for &s in samples {
        let v = (s.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16;
        writer
            .write_sample(v)
            .map_err(|e| AudioError::file(path, e))?;
    }
    writer.finalize().map_err(|e| AudioError::file(path, e))
}

/// A WAV file played as a capture source, real-time paced or as fast as possible.
pub struct WavCapture(MemoryCapture);

impl WavCapture {
    pub fn open(path: impl AsRef<Path>, pacing: Pacing) -> Result<Self, AudioError> {
        let path = path.as_ref();
        let (samples, format) = read_wav(path)?;
        let memory =
            MemoryCapture::new(samples, format, pacing)?.with_name(path.display().to_string());
        Ok(Self(memory))
    }
}

impl Capture for WavCapture {
    fn format(&self) -> StreamFormat {
        self.0.format()
    }
    fn read(&mut self, buf: &mut [f32], timeout: Duration) -> Result<ReadOutcome, AudioError> {
        self.0.read(buf, timeout)
    }
    fn stats(&self) -> StreamStats {
        self.0.stats()
    }
    fn name(&self) -> String {
        self.0.name()
    }
}

/// Writes what would be played to a mono 32-bit float WAV file at the source rate.
pub struct WavPlayback {
    path: PathBuf,
    writer: Option<hound::WavWriter<BufWriter<File>>>,
    sink: PacedSink,
}

impl WavPlayback {
    pub fn create(
        path: impl AsRef<Path>,
        source_rate: u32,
        pacing: Pacing,
    ) -> Result<Self, AudioError> {
        let path = path.as_ref().to_path_buf();
        StreamFormat::new(source_rate, 1).validate()?;
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: source_rate,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let writer =
            hound::WavWriter::create(&path, spec).map_err(|e| AudioError::file(&path, e))?;
        Ok(Self {
            path,
            writer: Some(writer),
            sink: PacedSink::new(source_rate, pacing),
        })
    }

    fn writer(&mut self) -> Result<&mut hound::WavWriter<BufWriter<File>>, AudioError> {
        self.writer
            .as_mut()
            .ok_or_else(|| AudioError::file(&self.path, "already closed after a write error"))
    }
}

impl Playback for WavPlayback {
    fn source_rate(&self) -> u32 {
        self.sink.rate
    }

    fn write(&mut self, samples: &[f32]) -> Result<(), AudioError> {
        self.sink.before_write(samples.len());
        let path = self.path.clone();
        let writer = self.writer()?;
        for &s in samples {
            writer
                .write_sample(s)
                .map_err(|e| AudioError::file(&path, e))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), AudioError> {
        self.sink.finish();
        let path = self.path.clone();
        // Rewrites the header so the file is valid even if the process dies later.
        self.writer()?
            .flush()
            .map_err(|e| AudioError::file(&path, e))
    }

    fn clear(&mut self) {}

    fn played(&self) -> u64 {
        self.sink.written
    }

    fn wait_idle(&mut self, _timeout: Duration) -> bool {
        self.sink.finish();
        true
    }

    fn stats(&self) -> StreamStats {
        StreamStats {
            frames: self.sink.written,
            ..StreamStats::default()
        }
    }
}

impl Drop for WavPlayback {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            let _ = writer.finalize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("audio-io-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn wav_round_trip_through_capture_and_playback() {
        let path = tmp("round.wav");
        let clip: Vec<f32> = (0..2400).map(|i| ((i as f32) * 0.01).sin() * 0.5).collect();
        {
            let mut playback =
                WavPlayback::create(&path, 24_000, Pacing::AsFastAsPossible).unwrap();
            playback.write(&clip[..1000]).unwrap();
            playback.write(&clip[1000..]).unwrap();
            playback.finish().unwrap();
            assert_eq!(playback.played(), 2400);
        }
        let mut capture = WavCapture::open(&path, Pacing::AsFastAsPossible).unwrap();
        assert_eq!(capture.format(), StreamFormat::new(24_000, 1));
        let mut buf = vec![0.0; 4096];
        let ReadOutcome::Samples(n) = capture.read(&mut buf, Duration::ZERO).unwrap() else {
            panic!("expected samples");
        };
        assert_eq!(&buf[..n], &clip[..]);
        assert_eq!(
            capture.read(&mut buf, Duration::ZERO).unwrap(),
            ReadOutcome::End
        );
    }

    #[test]
    fn sixteen_bit_stereo_decodes_to_unit_range() {
        let path = tmp("stereo16.wav");
        let clip = [0.5, -0.5, 1.0, -1.0];
        write_wav(&path, &clip, StreamFormat::new(44_100, 2)).unwrap();
        let (samples, format) = read_wav(&path).unwrap();
        assert_eq!(format, StreamFormat::new(44_100, 2));
        for (got, want) in samples.iter().zip(clip) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }

    #[test]
    fn malformed_files_are_errors() {
        let garbage = tmp("garbage.wav");
        std::fs::write(&garbage, b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk").unwrap();
        assert!(WavCapture::open(&garbage, Pacing::AsFastAsPossible).is_err());

        // A valid header whose data chunk is cut short.
        let truncated = tmp("truncated.wav");
        write_wav(&truncated, &vec![0.25; 1000], StreamFormat::new(16_000, 1)).unwrap();
        let bytes = std::fs::read(&truncated).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() - 301]).unwrap();
        let err = WavCapture::open(&truncated, Pacing::AsFastAsPossible);
        assert!(err.is_err(), "a truncated file must not decode silently");

        let missing = tmp("does-not-exist.wav");
        let msg = WavCapture::open(&missing, Pacing::AsFastAsPossible)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("does-not-exist.wav"), "{msg}");
    }
}
