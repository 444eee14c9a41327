//! The audio encoder ([`AudioEncoder`]): 16 kHz waveform → log-mel ([`crate::mel`]) →
//! FastConformer and adapter ([`crate::conformer`]) → one backbone embedding per 80 ms.

use candle_core::Tensor;

use crate::config::Lfm2AudioConfig;
use crate::conformer::{AudioAdapter, Conformer, EncoderConfig};
use crate::error::{Error, Result, Stop};
use crate::format::INPUT_SAMPLE_RATE;
use crate::mel::{MelFrontend, PreprocessorConfig};
use crate::resample::Resampler;
use crate::weights::Weights;

/// The shortest clip accepted, in 16 kHz samples (20 ms): two valid mel frames. Below that the
/// reference's features are all zero (under 160 samples) or its per-feature statistics are
/// undefined (under 320: a single frame, which the reference rejects on GPU), so a shorter clip
/// carries no information and is an error here.
pub const MIN_SAMPLES: usize = 320;

/// The longest clip encoded at once, in seconds: the encoder's attention grows with the square of
/// the length (about 200 MB at this length). Longer recordings are split (as `transcribe` does).
pub const MAX_SECONDS: usize = 120;

/// [`MAX_SECONDS`] in 16 kHz samples.
pub const MAX_SAMPLES: usize = MAX_SECONDS * INPUT_SAMPLE_RATE as usize;

/// The mel front-end, encoder and adapter.
#[derive(Debug)]
pub struct AudioEncoder {
    mel: MelFrontend,
    conformer: Conformer,
    adapter: AudioAdapter,
}

impl AudioEncoder {
    pub fn load(w: &Weights, cfg: &Lfm2AudioConfig) -> Result<Self> {
        let pre = PreprocessorConfig::from_json(&cfg.preprocessor, &cfg.path)?;
        let enc = EncoderConfig::from_json(&cfg.encoder, &cfg.path)?;
        Ok(Self {
            mel: MelFrontend::new(&pre),
            conformer: Conformer::load(w, &enc)?,
            adapter: AudioAdapter::load(w, enc.d_model, cfg.lfm.hidden_size)?,
        })
    }

    pub fn mel(&self) -> &MelFrontend {
        &self.mel
    }

    pub fn conformer(&self) -> &Conformer {
        &self.conformer
    }

    pub fn adapter(&self) -> &AudioAdapter {
        &self.adapter
    }

    /// Number of backbone positions a clip of `samples` 16 kHz samples takes.
    pub fn positions(&self, samples: usize) -> usize {
        self.conformer.config().output_len(self.mel.frames(samples))
    }

    /// Backbone embeddings `[positions, hidden]` of a 16 kHz mono clip.
    pub fn embed(&self, wave: &[f32]) -> Result<Tensor> {
        self.embed_until(wave, &crate::error::never)
    }

    /// As [`AudioEncoder::embed`], stopping between two layers of the encoder when `stop` says so
    /// ([`Error::Stopped`]).
    pub fn embed_until(&self, wave: &[f32], stop: Stop) -> Result<Tensor> {
        if wave.len() < MIN_SAMPLES {
            return Err(Error::Invalid(format!(
                "the clip is {} samples ({:.0} ms at 16 kHz); the encoder needs at least {MIN_SAMPLES} (20 ms)",
                wave.len(),
                wave.len() as f64 / 16.0
            )));
        }
        if wave.len() > MAX_SAMPLES {
            return Err(Error::Invalid(format!(
                "the clip is {:.1} s long; at most {MAX_SECONDS} s of audio is encoded at once",
                wave.len() as f64 / f64::from(INPUT_SAMPLE_RATE)
            )));
        }
        let mel = self.mel.compute(wave)?;
        self.adapter
            .forward(&self.conformer.forward_until(&mel, stop)?)
    }

    /// As [`AudioEncoder::embed`] for audio at any rate, resampled to 16 kHz as the reference does.
    pub fn embed_at(&self, wave: &[f32], sample_rate: u32) -> Result<Tensor> {
        if sample_rate == INPUT_SAMPLE_RATE {
            return self.embed(wave);
        }
        // Refused before resampling (which would allocate for all of it).
        if wave.len() as u64 > MAX_SECONDS as u64 * u64::from(sample_rate) + 1 {
            return Err(Error::Invalid(format!(
                "the clip is {:.1} s long; at most {MAX_SECONDS} s of audio is encoded at once",
                wave.len() as f64 / f64::from(sample_rate.max(1))
            )));
        }
        let wave = Resampler::resample_all(sample_rate, INPUT_SAMPLE_RATE, wave)
            .map_err(Error::Invalid)?;
        self.embed(&wave)
    }
}
