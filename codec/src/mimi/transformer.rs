//! Mimi's decoder transformer (`decoder_transformer.*`): causal self-attention limited to the
//! last `context` steps, interleaved RoPE, pre-LayerNorm, LayerScale, GELU feed-forward.
//!
//! Per layer: `x += ls1 ⊙ attn(LN1(x))`, then `x += ls2 ⊙ W2·gelu(W1·LN2(x))`, no biases.
//!
//! Window semantics: query step `p` sees key step `q` iff `0 ≤ p − q < context`, the mask of the
//! reference's batch `decode`. The reference's own streaming keeps a ring of exactly `context`
//! entries into which a whole call's steps are written first, so within a multi-step call the
//! earlier queries see fewer past steps than in batch mode; here streaming keeps the last
//! `context − 1` steps before the call, so streaming equals batch decoding.

use candle_core::{DType, Device, Tensor};
use lfm2_audio::nn::{LayerNorm, Linear, Rotary};
use lfm2_audio::weights::Weights;

use super::config::TransformerConfig;
use crate::{Error, Result};

/// LayerNorm epsilon of the reference (`nn.LayerNorm(d, eps=1e-5)`).
const LAYER_NORM_EPS: f64 = 1e-5;
/// Up to this many rows, a linear map runs row by row: the matrix-vector path of the CPU
/// matmul reads the weight as stored, while a small matrix-matrix product first repacks the
/// whole weight (measured 3× slower for the 2 rows of a streamed frame).
const ROW_BY_ROW_MAX: usize = 4;

/// `linear.forward(x)` for `x` `[T, in]`, taking the fast path for a few rows.
fn apply(linear: &Linear, x: &Tensor) -> Result<Tensor> {
    let t = x.dim(0)?;
    if t <= 1 || t > ROW_BY_ROW_MAX {
        return linear.forward(x);
    }
    let rows = (0..t)
        .map(|i| linear.forward(&x.narrow(0, i, 1)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

#[derive(Debug, Clone)]
struct Layer {
    norm1: LayerNorm,
    /// `in_projs.0`: `[3d, d]`, output laid out as (q|k|v, head, dim).
    in_proj: Linear,
    out_proj: Linear,
    norm2: LayerNorm,
    linear1: Linear,
    linear2: Linear,
    scale1: Option<Tensor>,
    scale2: Option<Tensor>,
}

/// Keys and values of the last steps, `[heads, steps, head_dim]`, in a buffer that grows
/// rarely: stale steps are dropped by moving a start index, and the live ones are moved to the
/// front only when the buffer is full.
#[derive(Debug, Clone)]
pub struct KvWindow {
    k: Tensor,
    v: Tensor,
    /// Live entries are `begin..end` of the buffer's step axis.
    begin: usize,
    end: usize,
    /// Absolute step of the entry at `begin`.
    first_step: usize,
    /// Steps kept between calls: `context − 1`.
    keep: usize,
}

impl KvWindow {
    /// An empty window keeping `keep` steps between calls, with room for `capacity` steps.
    pub fn new(heads: usize, head_dim: usize, keep: usize, capacity: usize) -> Result<Self> {
        let cap = capacity.max(1);
        Ok(Self {
            k: Tensor::zeros((heads, cap, head_dim), DType::F32, &Device::Cpu)?,
            v: Tensor::zeros((heads, cap, head_dim), DType::F32, &Device::Cpu)?,
            begin: 0,
            end: 0,
            first_step: 0,
            keep,
        })
    }

    /// Live steps.
    pub fn len(&self) -> usize {
        self.end - self.begin
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Absolute step of the oldest live entry.
    pub fn first_step(&self) -> usize {
        self.first_step
    }

    fn capacity(&self) -> usize {
        self.k.dim(1).unwrap_or(0)
    }

    /// Appends the steps of `k` and `v` (`[heads, n, head_dim]`).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(1)?;
        let live = self.len();
        if self.end + n > self.capacity() {
            let old_cap = self.capacity();
            let cap = old_cap.max(live + n);
            let begin = self.begin;
            let (h, _, d) = self.k.dims3()?;
            let grow = |old: &Tensor| -> Result<Tensor> {
                let live_part = old.narrow(1, begin, live)?.contiguous()?;
                let buf = if cap > old_cap {
                    Tensor::zeros((h, 2 * cap, d), DType::F32, &Device::Cpu)?
                } else {
                    old.clone()
                };
                if live > 0 {
                    buf.slice_set(&live_part, 1, 0)?;
                }
                Ok(buf)
            };
            self.k = grow(&self.k)?;
            self.v = grow(&self.v)?;
            self.begin = 0;
            self.end = live;
        }
        self.k.slice_set(&k.contiguous()?, 1, self.end)?;
        self.v.slice_set(&v.contiguous()?, 1, self.end)?;
        self.end += n;
        Ok(())
    }

    /// Views of the live keys and values.
    pub fn live(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(1, self.begin, self.len())?,
            self.v.narrow(1, self.begin, self.len())?,
        ))
    }

    /// Drops all but the last `keep` steps.
    pub fn forget_old(&mut self) {
        let drop = self.len().saturating_sub(self.keep);
        self.begin += drop;
        self.first_step += drop;
    }
}

/// The decoder transformer's weights.
#[derive(Debug, Clone)]
pub struct DecoderTransformer {
    layers: Vec<Layer>,
    /// Interleaved rotary embedding: pairs `(x[2i], x[2i+1])` turn by `p · f_i` with
    /// `f_i = exp(−2i·ln(max_period)/D)`.
    rope: Rotary,
    heads: usize,
    head_dim: usize,
    d_model: usize,
    context: usize,
}

/// What the transformer remembers between calls.
#[derive(Debug, Clone)]
pub struct TransformerState {
    /// Steps processed so far (the RoPE position of the next one).
    step: usize,
    caches: Vec<KvWindow>,
}

impl DecoderTransformer {
    /// Loads `{prefix}.transformer.layers.*`.
    pub fn load(w: &Weights, prefix: &str, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.d_model;
        let ff = cfg.dim_feedforward;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("{prefix}.transformer.layers.{i}");
            let scale = |n: usize| -> Result<Option<Tensor>> {
                cfg.layer_scale
                    .map(|_| w.get(&format!("{p}.layer_scale_{n}.scale"), &[d]))
                    .transpose()
            };
            layers.push(Layer {
                norm1: LayerNorm::load(w, &format!("{p}.norm1"), d, LAYER_NORM_EPS)?,
                in_proj: Linear::load(w, &format!("{p}.self_attn.in_projs.0"), 3 * d, d, false)?,
                out_proj: Linear::load(w, &format!("{p}.self_attn.out_projs.0"), d, d, false)?,
                norm2: LayerNorm::load(w, &format!("{p}.norm2"), d, LAYER_NORM_EPS)?,
                linear1: Linear::load(w, &format!("{p}.linear1"), ff, d, false)?,
                linear2: Linear::load(w, &format!("{p}.linear2"), d, ff, false)?,
                scale1: scale(1)?,
                scale2: scale(2)?,
            });
        }
        let head_dim = d / cfg.num_heads;
        Ok(Self {
            layers,
            rope: Rotary::with_max_period(head_dim, cfg.max_period),
            heads: cfg.num_heads,
            head_dim,
            d_model: d,
            context: cfg.context,
        })
    }

    /// The state of a new stream.
    pub fn new_state(&self) -> Result<TransformerState> {
        let keep = self.context - 1;
        let caches = (0..self.layers.len())
            .map(|_| KvWindow::new(self.heads, self.head_dim, keep, 2 * self.context))
            .collect::<Result<Vec<_>>>()?;
        Ok(TransformerState { step: 0, caches })
    }

    /// `x`: `[T, d]` at the next steps of `state` → `[T, d]`.
    pub fn step(&self, x: &Tensor, state: &mut TransformerState) -> Result<Tensor> {
        let t = x.dim(0)?;
        if t == 0 {
            return Ok(x.clone());
        }
        if state.caches.len() != self.layers.len() {
            return Err(Error::Invalid(
                "the transformer state belongs to another model".into(),
            ));
        }
        let start = state.step;
        let (cos, sin) = self.rope.tables(start, t)?;
        let mut x = x.contiguous()?;
        for (layer, cache) in self.layers.iter().zip(state.caches.iter_mut()) {
            let h = layer.norm1.forward(&x)?;
            let a = self.attention(layer, &h, start, &cos, &sin, cache)?;
            let a = match &layer.scale1 {
                Some(s) => a.broadcast_mul(s)?,
                None => a,
            };
            x = (x + a)?;
            let h = layer.norm2.forward(&x)?;
            let f = apply(&layer.linear2, &apply(&layer.linear1, &h)?.gelu_erf()?)?;
            let f = match &layer.scale2 {
                Some(s) => f.broadcast_mul(s)?,
                None => f,
            };
            x = (x + f)?;
        }
        state.step += t;
        Ok(x)
    }

    fn attention(
        &self,
        layer: &Layer,
        h: &Tensor,
        start: usize,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut KvWindow,
    ) -> Result<Tensor> {
        let t = h.dim(0)?;
        let (nh, hd, d) = (self.heads, self.head_dim, self.d_model);
        let qkv = apply(&layer.in_proj, h)?;
        let heads = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(1, i * d, d)?
                .reshape((t, nh, hd))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let rope = |y: Tensor| -> Result<Tensor> {
            Ok(candle_nn::rotary_emb::rope_i(&y.unsqueeze(0)?, cos, sin)?.squeeze(0)?)
        };
        let q = rope(heads(0)?)?;
        let k = rope(heads(1)?)?;
        let v = heads(2)?;
        cache.append(&k, &v)?;
        let (keys, values) = cache.live()?;
        let first = cache.first_step();
        let n = keys.dim(1)?;

        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?; // [heads, T, n]
        let scores = match self.mask(start, t, first, n)? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values.contiguous()?)?; // [heads, T, hd]
        cache.forget_old();
        let out = out.transpose(0, 1)?.reshape((t, d))?;
        apply(&layer.out_proj, &out)
    }

    /// Additive mask `[T, n]`: query step `start + i` sees key step `first + j` iff
    /// `0 ≤ (start + i) − (first + j) < context`. `None` when nothing is masked.
    fn mask(&self, start: usize, t: usize, first: usize, n: usize) -> Result<Option<Tensor>> {
        let mut any = false;
        let mut m = Vec::with_capacity(t * n);
        for i in 0..t {
            for j in 0..n {
                let (qp, kp) = (start + i, first + j);
                let ok = kp <= qp && qp - kp < self.context;
                any |= !ok;
                m.push(if ok { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        Ok(if any {
            Some(Tensor::from_vec(m, (t, n), &Device::Cpu)?)
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(first: usize, n: usize) -> Tensor {
        // Entry value = its absolute step, for 2 heads of width 1.
        let v: Vec<f32> = (0..2)
            .flat_map(|h| (first..first + n).map(move |s| (s + 100 * h) as f32))
            .collect();
        Tensor::from_vec(v, (2, n, 1), &Device::Cpu).unwrap()
    }

    fn live_steps(w: &KvWindow) -> Vec<Vec<f32>> {
        let (k, _) = w.live().unwrap();
        k.squeeze(2).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn window_keeps_the_last_steps_across_compaction_and_growth() {
        // keep 3 (context 4), room for 5.
        let mut w = KvWindow::new(2, 1, 3, 5).unwrap();
        w.append(&steps(0, 2), &steps(0, 2)).unwrap();
        assert_eq!(live_steps(&w), vec![vec![0., 1.], vec![100., 101.]]);
        w.forget_old();
        assert_eq!((w.first_step(), w.len()), (0, 2));
        w.append(&steps(2, 2), &steps(2, 2)).unwrap();
        assert_eq!(live_steps(&w)[0], vec![0., 1., 2., 3.]);
        w.forget_old();
        assert_eq!((w.first_step(), w.len()), (1, 3));
        // 3 live + 2 new fit exactly after moving the live steps to the front.
        w.append(&steps(4, 2), &steps(4, 2)).unwrap();
        assert_eq!(live_steps(&w)[1], vec![101., 102., 103., 104., 105.]);
        w.forget_old();
        assert_eq!(w.first_step(), 3);
        // 3 live + 7 new needs a larger buffer.
        w.append(&steps(6, 7), &steps(6, 7)).unwrap();
        assert_eq!(
            live_steps(&w)[0],
            (3..13).map(|s| s as f32).collect::<Vec<_>>()
        );
        w.forget_old();
        assert_eq!(live_steps(&w)[0], vec![10., 11., 12.]);
        assert_eq!(w.first_step(), 10);
    }

    #[test]
    fn mask_is_the_batch_window() {
        let tr = DecoderTransformer {
            layers: vec![],
            rope: Rotary::with_max_period(2, 10000.0),
            heads: 1,
            head_dim: 2,
            d_model: 2,
            context: 3,
        };
        // Queries 4, 5 over keys 2..=5: 4 sees 2, 3, 4; 5 sees 3, 4, 5.
        let m = tr
            .mask(4, 2, 2, 4)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, vec![vec![0., 0., 0., inf], vec![inf, 0., 0., 0.]]);
        assert!(tr.mask(2, 1, 0, 3).unwrap().is_none());
    }
}
