//! The LFM2 audio detokenizer of LFM2.5-Audio (`audio_detokenizer/`), streaming.
//!
//! Per code frame (liquid-audio `detokenizer.py`):
//! 1. fused embedding: the mean of the 8 rows `emb.emb.weight[c·2048 + code_c]`;
//! 2. ×6 nearest upsampling: the frame vector is repeated for 6 positions (75 Hz);
//! 3. the LFM2 stack (short convolutions and attention limited to a 30-position window,
//!    `0 ≤ i − j < 30`), final RMSNorm;
//! 4. `lin`: hidden → 1282, split into 641 log-magnitudes and 641 phases;
//! 5. the "same"-padded ISTFT (n_fft 1280, hop 320): 6 spectral frames = 1920 samples.
//!
//! Every stage is causal except the ISTFT overlap, which holds back 480 samples (20 ms).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lfm2_audio::config::Lfm2Config;
use lfm2_audio::lfm2::{Lfm2, Lfm2State};
use lfm2_audio::nn::Linear;
use lfm2_audio::weights::QuantPlan;
use lfm2_audio::weights::Weights;
use serde_json::Value;

use crate::istft::{self, StreamingIstft, BINS, N_FFT};
use lfm2_audio::format::{Frame, AUDIO_CODES, CODEBOOKS, SAMPLES_PER_FRAME};

use crate::{check_frames, Detokenizer, Error, Result};

/// Directory of the detokenizer inside a model directory.
pub const DIR: &str = "audio_detokenizer";
/// Spectral frames (LFM2 positions) per code frame: 12.5 Hz → 75 Hz.
pub const UPSAMPLE: usize = 6;
/// The reference's window when the config has no `sliding_window`.
const DEFAULT_WINDOW: usize = 30;
/// `lin` output width: log-magnitude and phase of each of the 641 bins.
const OUTPUT_SIZE: usize = 2 * BINS;
/// Code frames per network call in batch decoding: bounds the attention scores (positions ×
/// (positions + window)) without changing the result.
const BATCH_CHUNK: usize = 64;

/// Intermediate values of a batch decode, for inspection and parity tests.
#[derive(Debug, Clone)]
pub struct Lfm2DetokenizerTrace {
    /// Fused embeddings `[T, hidden]`.
    pub embedding: Tensor,
    /// Final-normed LFM2 output `[6T, hidden]`.
    pub hidden: Tensor,
    /// Log-magnitudes `[6T, 641]`.
    pub log_abs: Tensor,
    /// Phases in radians `[6T, 641]`.
    pub angle: Tensor,
    /// The waveform, `1920·T` samples.
    pub waveform: Vec<f32>,
}

/// The LFM2 audio detokenizer with its streaming state.
pub struct Lfm2Detokenizer {
    net: Network,
    /// Stream state: the LFM2 caches, the ISTFT overlap and the frames pushed so far.
    state: Lfm2State,
    istft: StreamingIstft,
    pushed: usize,
}

/// The weights: everything up to the spectral frames, plus the ISTFT window.
struct Network {
    /// `emb.emb.weight`, `[8·2048, hidden]`.
    embedding: Tensor,
    stack: Lfm2,
    lin: Linear,
    window: Vec<f32>,
    hidden: usize,
}

impl Lfm2Detokenizer {
    /// Loads `config.json` and `model.safetensors` from an `audio_detokenizer/` directory, in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, QuantPlan::f32())
    }

    /// As [`Lfm2Detokenizer::load`], storing the matrices as `plan` says (they are decode
    /// weights of the detokenizer's own stack).
    pub fn load_with(dir: &Path, plan: QuantPlan) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_owned(),
                what: "LFM2 audio detokenizer directory (LFM2.5-Audio only)",
            });
        }
        let config_path = dir.join("config.json");
        let cfg = read_config(&config_path)?;
        let weights = Weights::open(&dir.join("model.safetensors"))?.with_plan(plan);
        let det = Self::from_weights(cfg, &weights)?;
        let _ = weights.save_cache();
        Ok(det)
    }

    /// Builds the detokenizer from a parsed configuration and its weights.
    pub fn from_weights(mut cfg: Lfm2Config, w: &Weights) -> Result<Self> {
        // The reference builds its mask from `sliding_window` (30 when absent) whatever the
        // layer types say, so every attention layer is windowed.
        cfg.sliding_window = Some(cfg.sliding_window.unwrap_or(DEFAULT_WINDOW));
        let hidden = cfg.hidden_size;
        let embedding = w.get(
            "emb.emb.weight",
            &[CODEBOOKS * AUDIO_CODES as usize, hidden],
        )?;
        let stack = Lfm2::load(w, "lfm", &cfg)?;
        let lin = Linear::load(w, "lin", OUTPUT_SIZE, hidden, true)?;
        // `istft.window` is a persistent buffer: the reference uses the stored values.
        let window = if w.contains("istft.window") {
            w.get("istft.window", &[N_FFT])?.to_vec1::<f32>()?
        } else {
            istft::periodic_hann(N_FFT)
        };
        let istft = StreamingIstft::new(window.clone()).map_err(|e| Error::Config {
            path: w.path().to_owned(),
            key: "istft.window".into(),
            message: e.to_string(),
        })?;
        let state = stack.new_state()?;
        Ok(Self {
            net: Network {
                embedding,
                stack,
                lin,
                window,
                hidden,
            },
            state,
            istft,
            pushed: 0,
        })
    }

    /// The LFM2 configuration in use (with the window filled in).
    pub fn config(&self) -> &Lfm2Config {
        self.net.stack.config()
    }

    /// Batch decode keeping every intermediate (see [`Lfm2DetokenizerTrace`]). It does not touch
    /// the stream in progress.
    pub fn trace(&self, frames: &[Frame]) -> Result<Lfm2DetokenizerTrace> {
        self.net.trace(frames)
    }

    fn push_frame(&mut self, frame: &Frame, out: &mut Vec<f32>) -> Result<usize> {
        let (_, _, spec) = self
            .net
            .network(std::slice::from_ref(frame), &mut self.state)?;
        // Only the last window of positions is ever read again: keep memory flat in long speech.
        if let Some(back) = self.net.stack.lookback() {
            self.state
                .forget_before(self.state.len().saturating_sub(back))?;
        }
        Network::synthesize(&spec, &mut self.istft)?;
        self.pushed += 1;
        Ok(self.istft.emit(out))
    }
}

impl Network {
    /// Fused embeddings `[T, hidden]`: per frame the mean of its 8 codebook rows.
    fn embed(&self, frames: &[Frame]) -> Result<Tensor> {
        let ids: Vec<u32> = frames
            .iter()
            .flat_map(|f| {
                f.iter()
                    .enumerate()
                    .map(|(c, &code)| c as u32 * AUDIO_CODES + code)
            })
            .collect();
        let ids = Tensor::from_vec(ids, frames.len() * CODEBOOKS, &Device::Cpu)?;
        let rows = self.embedding.index_select(&ids, 0)?.reshape((
            frames.len(),
            CODEBOOKS,
            self.hidden,
        ))?;
        Ok(rows.mean(1)?)
    }

    /// Runs frames through embedding, upsampling, the LFM2 stack and `lin` at the next
    /// positions of `state`: returns (embedding `[T, h]`, hidden `[6T, h]`, lin output
    /// `[6T, 1282]`).
    fn network(&self, frames: &[Frame], state: &mut Lfm2State) -> Result<(Tensor, Tensor, Tensor)> {
        let t = frames.len();
        let emb = self.embed(frames)?;
        // nearest-exact interpolation by the integer factor 6: output j takes input ⌊j/6⌋.
        let up = emb
            .unsqueeze(1)?
            .broadcast_as((t, UPSAMPLE, self.hidden))?
            .reshape((t * UPSAMPLE, self.hidden))?;
        let hidden = self.stack.forward(&up, state)?;
        let spec = self.lin.forward(&hidden)?;
        Ok((emb, hidden, spec))
    }

    /// Pushes the spectral frames of a `[n, 1282]` lin output into an ISTFT.
    fn synthesize(spec: &Tensor, istft: &mut StreamingIstft) -> Result<()> {
        let rows = spec.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for row in rows {
            let (log_abs, angle) = row.split_at(BINS);
            istft.push_frame(log_abs, angle)?;
        }
        Ok(())
    }

    fn trace(&self, frames: &[Frame]) -> Result<Lfm2DetokenizerTrace> {
        check_frames(frames, 0)?;
        if frames.is_empty() {
            return Err(Error::Invalid("no audio frames to decode".into()));
        }
        let mut state = self.stack.new_state()?;
        let (mut embs, mut hiddens, mut specs) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in frames.chunks(BATCH_CHUNK) {
            let (e, h, s) = self.network(chunk, &mut state)?;
            embs.push(e);
            hiddens.push(h);
            specs.push(s);
        }
        let spec = Tensor::cat(&specs, 0)?;
        let mut istft = StreamingIstft::new(self.window.clone())?;
        let mut waveform = Vec::with_capacity(frames.len() * SAMPLES_PER_FRAME);
        Self::synthesize(&spec, &mut istft)?;
        istft.emit(&mut waveform);
        istft.finish(&mut waveform);
        Ok(Lfm2DetokenizerTrace {
            embedding: Tensor::cat(&embs, 0)?,
            hidden: Tensor::cat(&hiddens, 0)?,
            log_abs: spec.narrow(1, 0, BINS)?,
            angle: spec.narrow(1, BINS, BINS)?,
            waveform,
        })
    }
}

impl Detokenizer for Lfm2Detokenizer {
    fn lookahead(&self) -> usize {
        istft::PAD
    }

    fn push_into(&mut self, frame: &Frame, out: &mut Vec<f32>) -> Result<usize> {
        check_frames(std::slice::from_ref(frame), self.pushed)?;
        let result = self.push_frame(frame, out);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn flush_into(&mut self, out: &mut Vec<f32>) -> Result<usize> {
        let n = self.istft.finish(out);
        self.reset();
        Ok(n)
    }

    fn reset(&mut self) {
        // Every cache is indexed by position, so an empty one is exactly a fresh state; it keeps
        // its memory for the next utterance.
        self.state.truncate(0);
        self.istft.reset();
        self.pushed = 0;
    }

    fn decode(&self, frames: &[Frame]) -> Result<Vec<f32>> {
        if frames.is_empty() {
            check_frames(frames, 0)?;
            return Ok(Vec::new());
        }
        Ok(self.net.trace(frames)?.waveform)
    }
}

/// Reads `audio_detokenizer/config.json` (an LFM2 config at the top level, plus
/// `sliding_window` and `output_size`).
pub fn read_config(path: &Path) -> Result<Lfm2Config> {
    let text =
        lfm2_audio::config::read_config_text(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile {
                path: path.to_owned(),
                what: "LFM2 audio detokenizer configuration",
            },
            _ => Error::Io {
                path: path.to_owned(),
                source,
            },
        })?;
    let config_err = |key: &str, message: String| Error::Config {
        path: PathBuf::from(path),
        key: key.into(),
        message,
    };
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| config_err("<root>", format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(config_err("<root>", "expected a JSON object".into()));
    };
    // The reference hard-codes `lin` to 1282 outputs and the ISTFT to n_fft 1280; a config that
    // says otherwise describes a model this code would not reproduce.
    if let Some(size) = obj.get("output_size") {
        if size.as_u64() != Some(OUTPUT_SIZE as u64) {
            return Err(config_err(
                "output_size",
                format!("expected {OUTPUT_SIZE} (n_fft {N_FFT}), got {size}"),
            ));
        }
    }
    Lfm2Config::from_json(&obj, path, "")
}
