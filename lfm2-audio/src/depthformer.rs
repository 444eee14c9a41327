//! The audio output head: turning a backbone hidden state into one audio frame (8 Mimi codebook
//! codes) with the depthformer, and a frame back into a backbone input embedding.
//!
//! Per frame: `d = depth_linear(h)` reshaped to `[codebooks, dim]`; then for codebook c the
//! depthformer (a 6-layer GQA transformer, positions restarting at 0 every frame) runs one step on
//! `d[c] + prev`, its output is normed per codebook and projected to 2049 logits, a code is
//! sampled, and `prev` becomes that codebook's embedding of the code.

use candle_core::{Device, Tensor};

use crate::config::{DepthformerConfig, Lfm2Config};
use crate::error::{Error, Result};
use crate::lfm2::{FeedForward, Linear, RmsNorm, Table};
use crate::sampling::Sampler;
use crate::weights::{WeightClass, Weights};

/// Codes per codebook: the 2048 Mimi codes and the end-of-audio code.
pub const CODEBOOK_SIZE: usize = 2049;
/// The end-of-audio code; on codebook 0 it ends the audio of a reply.
pub const END_OF_AUDIO: u32 = 2048;
/// Query heads of the depthformer's attention (the reference's `MHA` default).
const HEADS: usize = 32;
/// Key/value heads (`gqa_dim` default).
const KV_HEADS: usize = 8;
/// Rotary base of the depthformer (`MHA` default theta).
const ROPE_THETA: f32 = 1e6;
/// RMSNorm epsilon throughout the audio head.
const NORM_EPS: f64 = 1e-5;

/// One audio frame: a code per codebook.
pub type Frame = Vec<u32>;

#[derive(Debug, Clone)]
struct DepthLayer {
    operator_norm: RmsNorm,
    qkv: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    out_proj: Linear,
    ffn_norm: RmsNorm,
    feed_forward: FeedForward,
}

/// Per-codebook embedding (the input for the next codebook) and logits head.
#[derive(Debug, Clone)]
struct CodebookHead {
    embedding: Table,
    norm: RmsNorm,
    to_logits: Linear,
}

/// The audio output head of LFM2-Audio.
#[derive(Debug, Clone)]
pub struct AudioHead {
    /// `[codebooks · 2049, hidden]`: frame embedding rows, codebook c at offset c · 2049.
    audio_embedding: Table,
    depth_linear: Linear,
    layers: Vec<DepthLayer>,
    codebooks: Vec<CodebookHead>,
    dim: usize,
    head_dim: usize,
    /// Interleaved-RoPE tables `[codebooks, head_dim/2]` for positions 0..codebooks.
    cos: Tensor,
    sin: Tensor,
}

/// What one frame's sampling saw, for inspection and tests.
#[derive(Debug, Clone)]
pub struct FrameTrace {
    /// `depth_linear(h)` as `[codebooks, dim]`.
    pub depth_in: Tensor,
    /// Depthformer outputs `[codebooks, dim]`.
    pub outputs: Tensor,
    /// Logits `[codebooks, 2049]`.
    pub logits: Tensor,
}

impl AudioHead {
    pub fn load(
        w: &Weights,
        lfm: &Lfm2Config,
        cfg: &DepthformerConfig,
        n_codebooks: usize,
    ) -> Result<Self> {
        let hidden = lfm.hidden_size;
        let dim = cfg.dim;
        let head_dim = dim / HEADS;
        if head_dim == 0 || !dim.is_multiple_of(HEADS) || !head_dim.is_multiple_of(2) {
            return Err(Error::Config {
                path: w.path().to_owned(),
                key: "depthformer.dim".into(),
                message: format!(
                    "must be a multiple of {} ({HEADS} heads of even width), got {dim}",
                    2 * HEADS
                ),
            });
        }
        let audio_embedding = Table::load(
            w,
            "audio_embedding.embedding.weight",
            n_codebooks * CODEBOOK_SIZE,
            hidden,
            WeightClass::Auxiliary,
        )?;
        let depth_linear = Linear::load(w, "depth_linear", n_codebooks * dim, hidden, true)?;
        let qkv_out = dim + 2 * KV_HEADS * head_dim;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("depthformer.layers.{i}");
            let ff_dim = w
                .shape(&format!("{p}.feed_forward.w1.weight"))?
                .first()
                .copied()
                .unwrap_or(0);
            layers.push(DepthLayer {
                operator_norm: RmsNorm::load(w, &format!("{p}.operator_norm"), dim, NORM_EPS)?,
                qkv: Linear::load(w, &format!("{p}.operator.qkv_proj"), qkv_out, dim, false)?,
                q_norm: RmsNorm::load(
                    w,
                    &format!("{p}.operator.bounded_attention.q_layernorm"),
                    head_dim,
                    NORM_EPS,
                )?,
                k_norm: RmsNorm::load(
                    w,
                    &format!("{p}.operator.bounded_attention.k_layernorm"),
                    head_dim,
                    NORM_EPS,
                )?,
                out_proj: Linear::load(w, &format!("{p}.operator.out_proj"), dim, dim, false)?,
                ffn_norm: RmsNorm::load(w, &format!("{p}.ffn_norm"), dim, NORM_EPS)?,
                feed_forward: FeedForward::load(w, &format!("{p}.feed_forward"), dim, ff_dim)?,
            });
        }
        let mut codebooks = Vec::with_capacity(n_codebooks);
        for c in 0..n_codebooks {
            let p = format!("depth_embeddings.{c}");
            let emb_name = format!("{p}.embedding.weight");
            let embedding = Table::load(w, &emb_name, CODEBOOK_SIZE, dim, WeightClass::Auxiliary)?;
            // A tied head stores no `to_logits`; the embedding table serves as the projection.
            let logits_name = format!("{p}.to_logits.weight");
            let to_logits = if w.contains(&logits_name) {
                Linear::load_class(
                    w,
                    &format!("{p}.to_logits"),
                    CODEBOOK_SIZE,
                    dim,
                    false,
                    WeightClass::Decode,
                )?
            } else if cfg.tie {
                Linear::from_matrix(
                    w,
                    &emb_name,
                    CODEBOOK_SIZE,
                    dim,
                    None,
                    WeightClass::Decode,
                    || w.get(&emb_name, &[CODEBOOK_SIZE, dim]),
                )?
            } else {
                return Err(Error::MissingTensor {
                    path: w.path().to_owned(),
                    name: logits_name,
                });
            };
            codebooks.push(CodebookHead {
                embedding,
                norm: RmsNorm::load(w, &format!("{p}.embedding_norm"), dim, NORM_EPS)?,
                to_logits,
            });
        }
        // precompute_freqs_cis(head_dim, ·, 1e6): angle = pos · 1/θ^(2i/d), in f32.
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / ROPE_THETA.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(n_codebooks * half);
        let mut sin = Vec::with_capacity(n_codebooks * half);
        for pos in 0..n_codebooks {
            for &f in &inv {
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            audio_embedding,
            depth_linear,
            layers,
            codebooks,
            dim,
            head_dim,
            cos: Tensor::from_vec(cos, (n_codebooks, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (n_codebooks, half), &Device::Cpu)?,
        })
    }

    /// Number of codebooks per frame.
    pub fn n_codebooks(&self) -> usize {
        self.codebooks.len()
    }

    /// The backbone input for a frame: `Σ_c audio_embedding[code_c + 2049·c]`.
    pub fn frame_embedding(&self, frame: &[u32]) -> Result<Tensor> {
        if frame.len() != self.codebooks.len() {
            return Err(Error::Invalid(format!(
                "a frame has {} codes, the model uses {}",
                frame.len(),
                self.codebooks.len()
            )));
        }
        let mut rows = Vec::with_capacity(frame.len());
        for (c, &code) in frame.iter().enumerate() {
            if code as usize >= CODEBOOK_SIZE {
                return Err(Error::Invalid(format!(
                    "audio code {code} on codebook {c} is over {END_OF_AUDIO}"
                )));
            }
            rows.push(code + (c * CODEBOOK_SIZE) as u32);
        }
        Ok(self.audio_embedding.lookup(&rows)?.sum(0)?)
    }

    /// Samples one frame from a final-normed backbone hidden state `[hidden]`.
    pub fn sample_frame(&self, hidden: &Tensor, sampler: &mut Sampler) -> Result<Frame> {
        Ok(self.run_frame(hidden, sampler, false)?.0)
    }

    /// As [`AudioHead::sample_frame`], also returning what the depthformer computed.
    pub fn sample_frame_traced(
        &self,
        hidden: &Tensor,
        sampler: &mut Sampler,
    ) -> Result<(Frame, FrameTrace)> {
        let (frame, trace) = self.run_frame(hidden, sampler, true)?;
        Ok((frame, trace.expect("traced")))
    }

    fn run_frame(
        &self,
        hidden: &Tensor,
        sampler: &mut Sampler,
        trace: bool,
    ) -> Result<(Frame, Option<FrameTrace>)> {
        let n = self.codebooks.len();
        let depth_in = self
            .depth_linear
            .forward(&hidden.reshape((1, ()))?)?
            .reshape((n, self.dim))?;
        let mut caches: Vec<(Vec<Tensor>, Vec<Tensor>)> =
            vec![(Vec::new(), Vec::new()); self.layers.len()];
        let mut prev: Option<Tensor> = None;
        let mut frame = Vec::with_capacity(n);
        let mut outputs = Vec::new();
        let mut all_logits = Vec::new();
        for (c, head) in self.codebooks.iter().enumerate() {
            let mut x = depth_in.narrow(0, c, 1)?;
            if let Some(p) = &prev {
                x = (x + p)?;
            }
            for (layer, (ks, vs)) in self.layers.iter().zip(caches.iter_mut()) {
                let attn = self.attention(layer, &layer.operator_norm.forward(&x)?, c, ks, vs)?;
                let h = (x + attn)?;
                let ff = layer.feed_forward.forward(&layer.ffn_norm.forward(&h)?)?;
                x = (h + ff)?;
            }
            let logits = head
                .to_logits
                .forward(&head.norm.forward(&x)?)?
                .squeeze(0)?;
            let code = sampler.sample(&logits.to_vec1::<f32>()?);
            frame.push(code);
            prev = Some(head.embedding.lookup(&[code])?);
            if trace {
                outputs.push(x);
                all_logits.push(logits.unsqueeze(0)?);
            }
        }
        let trace = if trace {
            Some(FrameTrace {
                depth_in,
                outputs: Tensor::cat(&outputs, 0)?,
                logits: Tensor::cat(&all_logits, 0)?,
            })
        } else {
            None
        };
        Ok((frame, trace))
    }

    /// One depthformer attention step at position `pos` (`x` is `[1, dim]`, normed).
    fn attention(
        &self,
        layer: &DepthLayer,
        x: &Tensor,
        pos: usize,
        ks: &mut Vec<Tensor>,
        vs: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let hd = self.head_dim;
        let qkv = layer.qkv.forward(x)?;
        let q = qkv.narrow(1, 0, self.dim)?.reshape((HEADS, hd))?;
        let k = qkv
            .narrow(1, self.dim, KV_HEADS * hd)?
            .reshape((KV_HEADS, hd))?;
        let v = qkv
            .narrow(1, self.dim + KV_HEADS * hd, KV_HEADS * hd)?
            .reshape((KV_HEADS, 1, hd))?;
        let (cos, sin) = (self.cos.narrow(0, pos, 1)?, self.sin.narrow(0, pos, 1)?);
        // Interleaved pairs (x[2i], x[2i+1]) rotate together: the complex-number convention.
        let rope = |t: Tensor, heads: usize| -> Result<Tensor> {
            let t = t.reshape((1, heads, 1, hd))?.contiguous()?;
            Ok(candle_nn::rotary_emb::rope_i(&t, &cos, &sin)?.reshape((heads, 1, hd))?)
        };
        let q = rope(layer.q_norm.forward(&q)?, HEADS)?;
        let k = rope(layer.k_norm.forward(&k)?, KV_HEADS)?;
        ks.push(k);
        vs.push(v);
        let keys = Tensor::cat(ks, 1)?; // [kv, pos+1, hd]
        let values = Tensor::cat(vs, 1)?;
        let group = HEADS / KV_HEADS;
        let q = q.reshape((KV_HEADS, group, hd))?;
        let scores = (q.matmul(&keys.t()?)? / (hd as f64).sqrt())?; // [kv, group, pos+1]
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values)?.reshape((1, HEADS * hd))?;
        layer.out_proj.forward(&out)
    }
}
