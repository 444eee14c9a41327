//! The decode path of Kyutai's Mimi codec, streaming: codes (12.5 Hz) → quantizer latent →
//! ×2 transposed-convolution upsampling (25 Hz) → decoder transformer → SEANet decoder (24 kHz).
//!
//! Every stage is causal, so each frame gives its 1920 samples at once. The weights are the
//! reference's `tokenizer-e351c8d8-checkpoint125.safetensors` (only the decoder half is read);
//! the hyperparameters are Mimi v0.1's, or those of a `mimi_config.json` next to the weights.
//!
//! Streaming and batch decoding agree here, both with the reference's batch `decode`; see
//! [`transformer`] for where the reference's own streaming mode departs from its batch mode.

pub mod config;
pub mod conv;
pub mod quantizer;
pub mod seanet;
pub mod transformer;

use std::path::Path;

use candle_core::Tensor;
use lfm2_audio::weights::Weights;

use lfm2_audio::format::{Frame, SAMPLES_PER_FRAME};

use crate::{check_frames, Detokenizer, Error, Result};
use config::MimiConfig;
use conv::{CausalConvTranspose1d, DepthwiseConvTranspose1d};
use quantizer::Quantizer;
use seanet::{SeanetDecoder, SeanetState};
use transformer::{DecoderTransformer, TransformerState};

/// Code frames per call in batch decoding: bounds the intermediate sizes (the last SEANet
/// stage handles 1920 samples × 64 channels per frame) without changing the result.
const BATCH_CHUNK: usize = 16;

/// Intermediate values of a batch decode, for inspection and parity tests.
#[derive(Debug, Clone)]
pub struct MimiTrace {
    /// Quantizer output `[dimension, T]` (both projections summed).
    pub latent: Tensor,
    /// After the ×2 upsampling, `[dimension, 2T]`.
    pub upsampled: Tensor,
    /// Decoder transformer output, `[dimension, 2T]`.
    pub transformer: Tensor,
    /// The waveform, `1920·T` samples.
    pub waveform: Vec<f32>,
}

#[derive(Debug, Clone)]
enum Upsample {
    /// The released checkpoint's channel-wise upsampling.
    Depthwise(DepthwiseConvTranspose1d),
    Dense(CausalConvTranspose1d),
}

#[derive(Debug, Clone)]
enum UpsampleState {
    Depthwise(Vec<f32>),
    Dense(Tensor),
}

/// Everything a Mimi stream remembers between frames.
#[derive(Debug, Clone)]
pub struct MimiState {
    upsample: UpsampleState,
    transformer: TransformerState,
    seanet: SeanetState,
}

/// The weights of the decode path.
#[derive(Debug, Clone)]
struct Network {
    cfg: MimiConfig,
    quantizer: Quantizer,
    upsample: Upsample,
    transformer: DecoderTransformer,
    seanet: SeanetDecoder,
}

/// The Mimi decoder with its streaming state.
pub struct MimiDecoder {
    net: Network,
    state: MimiState,
    pushed: usize,
}

impl MimiDecoder {
    /// Loads the Mimi weights at `path`, with the hyperparameters of a `mimi_config.json` in the
    /// same directory when there is one, else Mimi v0.1's.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_owned(),
                what: "Mimi codec weights",
            });
        }
        let config_path = path
            .parent()
            .map(|dir| dir.join(config::CONFIG_FILE))
            .filter(|p| p.is_file());
        let cfg = match config_path {
            Some(p) => MimiConfig::from_file(&p)?,
            None => MimiConfig::v0_1(),
        };
        let weights = Weights::open(path)?;
        Self::from_weights(cfg, &weights)
    }

    /// Builds the decoder from a configuration and the checkpoint's weights.
    pub fn from_weights(cfg: MimiConfig, w: &Weights) -> Result<Self> {
        cfg.validate(w.path())?;
        let dim = cfg.dimension();
        let stride = cfg.upsample_stride();
        let quantizer = Quantizer::load(w, "quantizer", &cfg.quantizer, dim)?;
        let upsample = if cfg.model.upsample_channel_wise_bug {
            Upsample::Depthwise(DepthwiseConvTranspose1d::load(
                w,
                "upsample.convtr",
                dim,
                2 * stride,
                stride,
            )?)
        } else {
            Upsample::Dense(CausalConvTranspose1d::load(
                w,
                "upsample.convtr",
                dim,
                dim,
                2 * stride,
                stride,
                false,
            )?)
        };
        let transformer = DecoderTransformer::load(w, "decoder_transformer", &cfg.transformer)?;
        let seanet = SeanetDecoder::load(w, "decoder", &cfg.seanet)?;
        let net = Network {
            cfg,
            quantizer,
            upsample,
            transformer,
            seanet,
        };
        let state = net.new_state()?;
        Ok(Self {
            net,
            state,
            pushed: 0,
        })
    }

    /// The hyperparameters in use.
    pub fn config(&self) -> &MimiConfig {
        &self.net.cfg
    }

    /// Batch decode keeping every intermediate (see [`MimiTrace`]). It does not touch the
    /// stream in progress.
    pub fn trace(&self, frames: &[Frame]) -> Result<MimiTrace> {
        check_frames(frames, 0)?;
        if frames.is_empty() {
            return Err(Error::Invalid("no audio frames to decode".into()));
        }
        let mut state = self.net.new_state()?;
        let (mut lat, mut up, mut tr) = (Vec::new(), Vec::new(), Vec::new());
        let mut waveform = Vec::with_capacity(frames.len() * SAMPLES_PER_FRAME);
        for chunk in frames.chunks(BATCH_CHUNK) {
            let s = self.net.step(chunk, &mut state)?;
            lat.push(s.latent);
            up.push(s.upsampled);
            tr.push(s.transformer);
            waveform.extend(s.waveform.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(MimiTrace {
            latent: Tensor::cat(&lat, 0)?.t()?.contiguous()?,
            upsampled: Tensor::cat(&up, 0)?.t()?.contiguous()?,
            transformer: Tensor::cat(&tr, 0)?.t()?.contiguous()?,
            waveform,
        })
    }
}

/// One call's outputs, time first: latent `[T, d]`, upsampled and transformer `[2T, d]`,
/// waveform `[1, 1, 1920·T]`.
struct StepOutput {
    latent: Tensor,
    upsampled: Tensor,
    transformer: Tensor,
    waveform: Tensor,
}

impl Network {
    fn new_state(&self) -> Result<MimiState> {
        Ok(MimiState {
            upsample: match &self.upsample {
                Upsample::Depthwise(u) => UpsampleState::Depthwise(u.initial_state()),
                Upsample::Dense(u) => UpsampleState::Dense(u.initial_state()?),
            },
            transformer: self.transformer.new_state()?,
            seanet: self.seanet.new_state()?,
        })
    }

    fn step(&self, frames: &[Frame], state: &mut MimiState) -> Result<StepOutput> {
        let latent = self.quantizer.decode(frames)?; // [T, d]
        let x = latent.t()?.unsqueeze(0)?.contiguous()?; // [1, d, T]
        let up = match (&self.upsample, &mut state.upsample) {
            (Upsample::Depthwise(u), UpsampleState::Depthwise(s)) => u.step(&x, s)?,
            (Upsample::Dense(u), UpsampleState::Dense(s)) => u.step(&x, s)?,
            _ => {
                return Err(Error::Invalid(
                    "the Mimi state belongs to another model".into(),
                ))
            }
        };
        let up = up.squeeze(0)?.t()?.contiguous()?; // [2T, d]
        let tr = self.transformer.step(&up, &mut state.transformer)?;
        let wave = self
            .seanet
            .step(&tr.t()?.unsqueeze(0)?.contiguous()?, &mut state.seanet)?;
        Ok(StepOutput {
            latent,
            upsampled: up,
            transformer: tr,
            waveform: wave,
        })
    }
}

impl Detokenizer for MimiDecoder {
    fn lookahead(&self) -> usize {
        0
    }

    fn push_into(&mut self, frame: &Frame, out: &mut Vec<f32>) -> Result<usize> {
        check_frames(std::slice::from_ref(frame), self.pushed)?;
        let result = self
            .net
            .step(std::slice::from_ref(frame), &mut self.state)
            .and_then(|s| Ok(s.waveform.flatten_all()?.to_vec1::<f32>()?));
        match result {
            Ok(samples) => {
                self.pushed += 1;
                out.extend_from_slice(&samples);
                Ok(samples.len())
            }
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }

    fn flush_into(&mut self, _out: &mut Vec<f32>) -> Result<usize> {
        self.reset();
        Ok(0)
    }

    fn reset(&mut self) {
        if let Ok(state) = self.net.new_state() {
            self.state = state;
        }
        self.pushed = 0;
    }

    fn decode(&self, frames: &[Frame]) -> Result<Vec<f32>> {
        if frames.is_empty() {
            check_frames(frames, 0)?;
            return Ok(Vec::new());
        }
        Ok(self.trace(frames)?.waveform)
    }
}
