//! The audio output head: turning a backbone hidden state into one audio frame (8 Mimi codebook
//! codes) with the depthformer, and a frame back into a backbone input embedding.
//!
//! Per frame: `d = depth_linear(h)` reshaped to `[codebooks, dim]`; then for codebook c the
//! depthformer (a 6-layer GQA transformer, positions restarting at 0 every frame) runs one step on
//! `d[c] + prev`, its output is normed per codebook and projected to 2049 logits, a code is
//! sampled, and `prev` becomes that codebook's embedding of the code.
//!
//! The frame runs on plain f32 buffers kept in the head from frame to frame (the activations
//! are a few thousand values, so allocating tensors and dispatching each operation cost more
//! than the arithmetic): matrix products go straight to the quantized matrix-vector kernel (or
//! to the same f32 product as the tensor path, which keeps f32 exact), and the attention reads
//! a key/value buffer of the frame's 8 positions.

use std::sync::Mutex;

use candle_core::{Device, Tensor};

use crate::config::{DepthformerConfig, Lfm2Config};
use crate::error::{Error, Result};
use crate::format::{Frame, CODEBOOKS, CODEBOOK_CLASSES, END_OF_AUDIO};
use crate::nn::{FeedForward, Linear, RmsNorm, Rotary, Table};
use crate::ops::{self, with_f32_slice};
use crate::quant::Reread;
use crate::sampling::Sampler;
use crate::weights::{WeightClass, Weights};

/// Query heads of the depthformer's attention (the reference's `MHA` default).
const HEADS: usize = 32;
/// Key/value heads (`gqa_dim` default).
const KV_HEADS: usize = 8;
/// Rotary base of the depthformer (`MHA` default theta).
const ROPE_THETA: f64 = 1e6;
/// RMSNorm epsilon throughout the audio head.
const NORM_EPS: f64 = 1e-5;

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
    cos: Vec<f32>,
    sin: Vec<f32>,
    buffers: BufferCell,
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
        if n_codebooks != CODEBOOKS {
            return Err(Error::Config {
                path: w.path().to_owned(),
                key: "codebooks".into(),
                message: format!("must be {CODEBOOKS} (the codecs decode frames of {CODEBOOKS} codes), got {n_codebooks}"),
            });
        }
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
            n_codebooks * CODEBOOK_CLASSES,
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
            // A frame reads every layer 8 times within a few milliseconds (and nothing else
            // in between), so its products prefetch as for weights found mostly in L3.
            let mut qkv = Linear::load(w, &format!("{p}.operator.qkv_proj"), qkv_out, dim, false)?;
            let mut out_proj = Linear::load(w, &format!("{p}.operator.out_proj"), dim, dim, false)?;
            let mut feed_forward = FeedForward::load(w, &format!("{p}.feed_forward"), dim, ff_dim)?;
            qkv.set_reread(Reread::Often);
            out_proj.set_reread(Reread::Often);
            feed_forward.set_reread(Reread::Often);
            layers.push(DepthLayer {
                operator_norm: RmsNorm::load(w, &format!("{p}.operator_norm"), dim, NORM_EPS)?,
                qkv,
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
                out_proj,
                ffn_norm: RmsNorm::load(w, &format!("{p}.ffn_norm"), dim, NORM_EPS)?,
                feed_forward,
            });
        }
        let mut codebooks = Vec::with_capacity(n_codebooks);
        for c in 0..n_codebooks {
            let p = format!("depth_embeddings.{c}");
            let emb_name = format!("{p}.embedding.weight");
            let embedding =
                Table::load(w, &emb_name, CODEBOOK_CLASSES, dim, WeightClass::Auxiliary)?;
            // A tied head stores no `to_logits`; the embedding table serves as the projection.
            let logits_name = format!("{p}.to_logits.weight");
            let to_logits = if w.contains(&logits_name) {
                Linear::load_class(
                    w,
                    &format!("{p}.to_logits"),
                    CODEBOOK_CLASSES,
                    dim,
                    false,
                    WeightClass::Decode,
                )?
            } else if cfg.tie {
                Linear::from_matrix(
                    w,
                    &emb_name,
                    CODEBOOK_CLASSES,
                    dim,
                    None,
                    WeightClass::Decode,
                    || w.get(&emb_name, &[CODEBOOK_CLASSES, dim]),
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
        let (cos, sin) = Rotary::new(head_dim, ROPE_THETA).values(0, n_codebooks);
        Ok(Self {
            audio_embedding,
            depth_linear,
            layers,
            codebooks,
            dim,
            head_dim,
            cos,
            sin,
            buffers: BufferCell::default(),
        })
    }

    /// Number of codebooks per frame.
    pub fn n_codebooks(&self) -> usize {
        self.codebooks.len()
    }

    /// Bytes of weights one frame reads: `depth_linear` once, every layer once per codebook, and
    /// each codebook's logits head (the single embedding rows a frame looks up are left out).
    pub fn frame_weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.weight_bytes() + l.out_proj.weight_bytes() + l.feed_forward.weight_bytes()
            })
            .sum();
        let heads: usize = self
            .codebooks
            .iter()
            .map(|c| c.to_logits.weight_bytes())
            .sum();
        self.depth_linear.weight_bytes() + self.codebooks.len() * layers + heads
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
            if code as usize >= CODEBOOK_CLASSES {
                return Err(Error::Invalid(format!(
                    "audio code {code} on codebook {c} is over {END_OF_AUDIO}"
                )));
            }
            rows.push(code + (c * CODEBOOK_CLASSES) as u32);
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
        let mut guard = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let b = guard.get_or_insert_with(|| FrameBuffers::new(self));
        let hidden = hidden.flatten_all()?.contiguous()?;
        with_f32_slice(&hidden, |h| {
            self.depth_linear.forward_vec(h, &mut b.depth_in)
        })?;
        let n = self.codebooks.len();
        let (dim, hd) = (self.dim, self.head_dim);
        let kv_dim = KV_HEADS * hd;
        let half = hd / 2;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut frame = [0u32; CODEBOOKS];
        let mut outputs = Vec::new();
        let mut all_logits = Vec::new();
        for (c, head) in self.codebooks.iter().enumerate() {
            // x = d[c] + prev (the previous codebook's embedding of its code; none at c = 0).
            b.x.copy_from_slice(&b.depth_in[c * dim..(c + 1) * dim]);
            if c > 0 {
                ops::add_assign(&mut b.x, &b.prev);
            }
            let (cos, sin) = (
                &self.cos[c * half..(c + 1) * half],
                &self.sin[c * half..(c + 1) * half],
            );
            for (l, layer) in self.layers.iter().enumerate() {
                // h = x + out_proj(attention(operator_norm(x)))
                layer.operator_norm.forward_vec(&b.x, &mut b.normed);
                layer.qkv.forward_vec(&b.normed, &mut b.qkv)?;
                let (q, kv) = b.qkv.split_at_mut(dim);
                let (k, v) = kv.split_at_mut(kv_dim);
                layer.q_norm.forward_heads(q);
                layer.k_norm.forward_heads(k);
                ops::rope_interleaved(q, cos, sin);
                ops::rope_interleaved(k, cos, sin);
                // The cache of layer l is [kv_heads, codebooks, head_dim], position c.
                let base = l * KV_HEADS * n * hd;
                for g in 0..KV_HEADS {
                    let at = base + (g * n + c) * hd;
                    b.keys[at..at + hd].copy_from_slice(&k[g * hd..(g + 1) * hd]);
                    b.values[at..at + hd].copy_from_slice(&v[g * hd..(g + 1) * hd]);
                }
                let (keys, values) = (&b.keys[..], &b.values[..]);
                let at = |g: usize| base + g * n * hd..base + g * n * hd + (c + 1) * hd;
                ops::attend(
                    q,
                    HEADS,
                    KV_HEADS,
                    hd,
                    c + 1,
                    |g| &keys[at(g)],
                    |g| &values[at(g)],
                    scale,
                    &mut b.scores,
                    &mut b.attn,
                );
                layer.out_proj.forward_vec(&b.attn, &mut b.out)?;
                ops::add_assign(&mut b.x, &b.out);
                // x = h + feed_forward(ffn_norm(h))
                layer.ffn_norm.forward_vec(&b.x, &mut b.normed);
                let ff = layer.feed_forward.ff_dim();
                layer.feed_forward.forward_vec(
                    &b.normed,
                    &mut b.gate[..ff],
                    &mut b.up[..ff],
                    &mut b.out,
                )?;
                ops::add_assign(&mut b.x, &b.out);
            }
            head.norm.forward_vec(&b.x, &mut b.normed);
            head.to_logits.forward_vec(&b.normed, &mut b.logits)?;
            let code = sampler.sample(&b.logits);
            frame[c] = code;
            head.embedding.row_into(code, &mut b.prev)?;
            if trace {
                outputs.extend_from_slice(&b.x);
                all_logits.extend_from_slice(&b.logits);
            }
        }
        let trace = if trace {
            Some(FrameTrace {
                depth_in: Tensor::from_slice(&b.depth_in, (n, dim), &Device::Cpu)?,
                outputs: Tensor::from_vec(outputs, (n, dim), &Device::Cpu)?,
                logits: Tensor::from_vec(all_logits, (n, CODEBOOK_CLASSES), &Device::Cpu)?,
            })
        } else {
            None
        };
        Ok((frame, trace))
    }
}

/// The buffers of one frame's run, kept from frame to frame: the residual stream, the
/// intermediate vectors of a layer, and the keys and values of the 8 positions of every layer.
#[derive(Debug)]
struct FrameBuffers {
    /// `depth_linear(h)`, `[codebooks, dim]`.
    depth_in: Vec<f32>,
    /// The previous codebook's code embedding, `[dim]`.
    prev: Vec<f32>,
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Post-RoPE keys, `[layers, kv_heads, codebooks, head_dim]`.
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
}

impl FrameBuffers {
    fn new(head: &AudioHead) -> Self {
        let (n, dim, hd) = (head.codebooks.len(), head.dim, head.head_dim);
        let ff = head
            .layers
            .iter()
            .map(|l| l.feed_forward.ff_dim())
            .max()
            .unwrap_or(0);
        let cache = head.layers.len() * KV_HEADS * n * hd;
        Self {
            depth_in: vec![0.0; n * dim],
            prev: vec![0.0; dim],
            x: vec![0.0; dim],
            normed: vec![0.0; dim],
            qkv: vec![0.0; dim + 2 * KV_HEADS * hd],
            attn: vec![0.0; dim],
            out: vec![0.0; dim],
            gate: vec![0.0; ff],
            up: vec![0.0; ff],
            keys: vec![0.0; cache],
            values: vec![0.0; cache],
            scores: vec![0.0; n * HEADS / KV_HEADS],
            logits: vec![0.0; CODEBOOK_CLASSES],
        }
    }
}

/// A lazily built [`FrameBuffers`] behind a lock (the head is shared between threads; one frame
/// runs at a time). A clone starts without buffers.
#[derive(Debug, Default)]
struct BufferCell(Mutex<Option<FrameBuffers>>);

impl Clone for BufferCell {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::ops::Deref for BufferCell {
    type Target = Mutex<Option<FrameBuffers>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
