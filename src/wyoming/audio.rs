//! Audio of Wyoming chunks: any rate, sample width and channel count in, the model's 16 kHz mono
//! out (with the same resampler as `lfm2d transcribe`); the model's 24 kHz speech out as 16-bit
//! PCM.

use lfm2_audio::format::INPUT_SAMPLE_RATE;
use lfm2_audio::resample::Resampler;

/// Rates accepted in chunks.
pub const MIN_RATE: u32 = 1_000;
pub const MAX_RATE: u32 = 384_000;
/// The resampler's filter bank grows with the product of the reduced rates; rates whose ratio
/// to 16 kHz is that awkward (44101 Hz) are refused instead of costing hundreds of megabytes.
const MAX_RATIO_PRODUCT: u64 = 400_000;

/// The format of a chunk, as `audio-start` and `audio-chunk` give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub rate: u32,
    /// Bytes per sample: 1 (unsigned 8-bit), 2, 3 or 4 (signed little-endian).
    pub width: u16,
    pub channels: u16,
}

impl Format {
    /// Reads `rate`, `width` and `channels` from an event's data; says what is wrong otherwise.
    pub fn from_data(data: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let field = |key: &str| -> Result<u64, String> {
            data.get(key)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("{key} is missing or not a positive integer"))
        };
        let rate = field("rate")?;
        let width = field("width")?;
        let channels = field("channels")?;
        if !(MIN_RATE as u64..=MAX_RATE as u64).contains(&rate) {
            return Err(format!(
                "rate {rate} Hz is not supported (expected {MIN_RATE} to {MAX_RATE} Hz)"
            ));
        }
        if !(1..=4).contains(&width) {
            return Err(format!(
                "width {width} is not supported (expected 1, 2, 3 or 4 bytes per sample)"
            ));
        }
        if !(1..=32).contains(&channels) {
            return Err(format!(
                "channels {channels} is not supported (expected 1 to 32)"
            ));
        }
        let g = gcd(rate, INPUT_SAMPLE_RATE as u64);
        if (rate / g) * (INPUT_SAMPLE_RATE as u64 / g) > MAX_RATIO_PRODUCT {
            return Err(format!(
                "rate {rate} Hz is not supported: its ratio to 16000 Hz is too awkward to resample (use a common rate such as 16000, 22050, 44100 or 48000)"
            ));
        }
        Ok(Self {
            rate: rate as u32,
            width: width as u16,
            channels: channels as u16,
        })
    }

    fn frame_bytes(&self) -> usize {
        self.width as usize * self.channels as usize
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Interleaved PCM of `format` to mono samples in [-1, 1] (the channels averaged).
pub fn decode(bytes: &[u8], format: Format) -> Result<Vec<f32>, String> {
    let frame = format.frame_bytes();
    if !bytes.len().is_multiple_of(frame) {
        return Err(format!(
            "{} bytes is not a whole number of {}-channel {}-byte samples",
            bytes.len(),
            format.channels,
            format.width
        ));
    }
    let w = format.width as usize;
    let sample = |b: &[u8]| -> f32 {
        match w {
            1 => (b[0] as f32 - 128.0) / 128.0,
            2 => i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0,
            3 => (i32::from_le_bytes([0, b[0], b[1], b[2]]) >> 8) as f32 / 8_388_608.0,
            _ => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32 / 2_147_483_648.0,
        }
    };
    let channels = format.channels as f32;
    Ok(bytes
        .chunks_exact(frame)
        .map(|f| f.chunks_exact(w).map(sample).sum::<f32>() / channels)
        .collect())
}

/// 16-bit little-endian PCM of samples in [-1, 1].
pub fn encode_pcm16(samples: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    for &s in samples {
        let v = (s.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Collects one utterance of chunks as 16 kHz mono, whatever their format (a change of rate
/// midway starts a new resampler).
pub struct Collector {
    resampler: Option<Resampler>,
    pub samples: Vec<f32>,
    max_samples: usize,
}

impl Collector {
    pub fn new(max_seconds: usize) -> Self {
        Self {
            resampler: None,
            samples: Vec::new(),
            max_samples: max_seconds * INPUT_SAMPLE_RATE as usize,
        }
    }

    /// Adds a chunk; an error says why it was not used.
    pub fn push(&mut self, bytes: &[u8], format: Format) -> Result<(), String> {
        let mono = decode(bytes, format)?;
        if self.resampler.as_ref().map(Resampler::rates) != Some((format.rate, INPUT_SAMPLE_RATE)) {
            self.finish_resampler();
            self.resampler = Some(Resampler::new(format.rate, INPUT_SAMPLE_RATE)?);
        }
        if let Some(r) = self.resampler.as_mut() {
            r.push(&mono, &mut self.samples);
        }
        if self.samples.len() > self.max_samples {
            self.samples.truncate(self.max_samples);
            return Err(format!(
                "the utterance is longer than {} s; the rest is dropped",
                self.max_samples / INPUT_SAMPLE_RATE as usize
            ));
        }
        Ok(())
    }

    fn finish_resampler(&mut self) {
        if let Some(mut r) = self.resampler.take() {
            r.finish(&mut self.samples);
        }
    }

    /// The whole utterance.
    pub fn finish(mut self) -> Vec<f32> {
        self.finish_resampler();
        self.samples.truncate(self.max_samples);
        self.samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn format(v: serde_json::Value) -> Result<Format, String> {
        Format::from_data(v.as_object().unwrap())
    }

    #[test]
    fn formats_are_checked() {
        assert!(format(json!({"rate": 16000, "width": 2, "channels": 1})).is_ok());
        assert!(format(json!({"rate": 44100, "width": 3, "channels": 2})).is_ok());
        assert!(format(json!({"rate": 11025, "width": 1, "channels": 1})).is_ok());
        let e = format(json!({"rate": 16000, "width": 5, "channels": 1})).unwrap_err();
        assert!(e.contains("width 5"), "{e}");
        let e = format(json!({"rate": 0, "width": 2, "channels": 1})).unwrap_err();
        assert!(e.contains("rate 0"), "{e}");
        let e = format(json!({"rate": 44101, "width": 2, "channels": 1})).unwrap_err();
        assert!(e.contains("44101"), "{e}");
        let e = format(json!({"rate": "fast", "width": 2, "channels": 1})).unwrap_err();
        assert!(e.contains("rate is missing"), "{e}");
        assert!(format(json!({"rate": 16000, "width": 2})).is_err());
    }

    #[test]
    fn samples_of_every_width_decode_alike() {
        let f = |width, channels| Format {
            rate: 16000,
            width,
            channels,
        };
        assert_eq!(
            decode(&[0, 255], f(1, 1)).unwrap(),
            vec![-1.0, 127.0 / 128.0]
        );
        assert_eq!(
            decode(&[0x00, 0x40, 0x00, 0xc0], f(2, 1)).unwrap(),
            vec![0.5, -0.5]
        );
        assert_eq!(decode(&[0, 0, 0x40], f(3, 1)).unwrap(), vec![0.5]);
        assert_eq!(decode(&[0, 0, 0, 0xc0], f(4, 1)).unwrap(), vec![-0.5]);
        // Stereo is averaged.
        assert_eq!(
            decode(&[0x00, 0x40, 0x00, 0x00], f(2, 2)).unwrap(),
            vec![0.25]
        );
        let e = decode(&[0, 0, 0], f(2, 1)).unwrap_err();
        assert!(e.contains("3 bytes"), "{e}");
    }

    #[test]
    fn a_tone_survives_resampling_from_other_rates() {
        for rate in [8000u32, 16000, 22050, 44100, 48000] {
            let n = rate as usize / 2;
            let pcm: Vec<f32> = (0..n)
                .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate as f32).sin())
                .collect();
            let mut c = Collector::new(60);
            let fmt = Format {
                rate,
                width: 2,
                channels: 1,
            };
            for piece in encode_pcm16(&pcm).chunks(2 * 333) {
                c.push(piece, fmt).unwrap();
            }
            let out = c.finish();
            assert!(
                (out.len() as i64 - 8000).abs() <= 2,
                "{rate}: {}",
                out.len()
            );
            let rms = (out[1000..7000].iter().map(|x| x * x).sum::<f32>() / 6000.0).sqrt();
            assert!((rms - 0.5 / 2f32.sqrt()).abs() < 0.02, "{rate}: rms {rms}");
        }
    }

    #[test]
    fn too_long_an_utterance_is_cut() {
        let mut c = Collector::new(1);
        let fmt = Format {
            rate: 16000,
            width: 2,
            channels: 1,
        };
        c.push(&vec![0; 2 * 16000], fmt).unwrap();
        assert!(c.push(&[0; 2], fmt).is_err());
        assert_eq!(c.finish().len(), 16000);
    }
}
