//! The LFM2 stack: gated short-convolution and grouped-query-attention layers with SwiGLU
//! feed-forwards and a final RMSNorm, taking input embeddings and returning hidden states.
//!
//! One implementation serves the LFM2-Audio backbone (width 2048, full causal attention) and the
//! LFM2.5 audio detokenizer (width 512, a 30-position sliding window). Inputs are `[T, hidden]`
//! (batch 1); positions continue from what the [`Lfm2State`] already holds.

use candle_core::{DType, Device, Tensor};

use crate::cache::PositionCache;
use crate::config::{LayerKind, Lfm2Config};
use crate::error::{Error, Result, Stop};
use crate::nn::{forward_vec_many, FeedForward, Linear, RmsNorm, Rotary};
use crate::ops::{self, with_f32_slice};
use crate::weights::Weights;

/// Initial room, in positions, of each layer's caches; they grow by doubling.
const INITIAL_CAPACITY: usize = 256;

/// The gated short convolution: `out_proj(C ⊙ conv(B ⊙ x))` with `[B, C, x] = in_proj(input)` and
/// a causal depthwise convolution over time; no activation anywhere.
#[derive(Debug, Clone)]
struct ShortConv {
    in_proj: Linear,
    out_proj: Linear,
    /// Kernel taps `[kernel, hidden]`: `taps[k]` multiplies the input `kernel - 1 - k` steps back.
    taps: Tensor,
    bias: Option<Tensor>,
    /// `taps` and `bias` as plain values, for the single-position step.
    tap_values: Vec<f32>,
    bias_values: Option<Vec<f32>>,
    hidden: usize,
    kernel: usize,
}

impl ShortConv {
    fn load(w: &Weights, prefix: &str, cfg: &Lfm2Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let k = cfg.conv_kernel;
        let weight = w.get(&format!("{prefix}.conv.weight"), &[h, 1, k])?;
        let taps = weight.reshape((h, k))?.t()?.contiguous()?;
        let bias = if cfg.conv_bias {
            Some(w.get(&format!("{prefix}.conv.bias"), &[h])?)
        } else {
            None
        };
        Ok(Self {
            in_proj: Linear::load(w, &format!("{prefix}.in_proj"), 3 * h, h, cfg.conv_bias)?,
            out_proj: Linear::load(w, &format!("{prefix}.out_proj"), h, h, cfg.conv_bias)?,
            tap_values: taps.flatten_all()?.to_vec1::<f32>()?,
            bias_values: bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?,
            taps,
            bias,
            hidden: h,
            kernel: k,
        })
    }

    /// `x`: `[T, hidden]`; `history` holds `B ⊙ x` of every earlier position and receives the new ones.
    fn forward(&self, x: &Tensor, history: &mut PositionCache) -> Result<Tensor> {
        let t = x.dim(0)?;
        let h = self.hidden;
        let bcx = self.in_proj.forward(x)?;
        // Split order is (B, C, x) along channels.
        let b = bcx.narrow(1, 0, h)?;
        let c = bcx.narrow(1, h, h)?;
        let xs = bcx.narrow(1, 2 * h, h)?;
        let u = (b * xs)?;

        // conv[t] = Σ_k taps[k] ⊙ u[t - (K-1) + k], with zeros before the first position.
        let past = self.kernel - 1;
        let start = history.len();
        let have = past.min(start);
        let mut parts = Vec::with_capacity(3);
        if have < past {
            parts.push(Tensor::zeros((past - have, h), DType::F32, &Device::Cpu)?);
        }
        if have > 0 {
            parts.push(history.range(start - have, have)?);
        }
        history.append(&u)?;
        parts.push(u);
        let ext = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        };
        let mut conv = ext.narrow(0, 0, t)?.broadcast_mul(&self.taps.get(0)?)?;
        for k in 1..self.kernel {
            conv = (conv + ext.narrow(0, k, t)?.broadcast_mul(&self.taps.get(k)?)?)?;
        }
        if let Some(bias) = &self.bias {
            conv = conv.broadcast_add(bias)?;
        }
        self.out_proj.forward(&(c * conv)?)
    }
}

impl ShortConv {
    /// One position: `x` is the normed input (`hidden` values), the result goes to `out`.
    /// Computes what [`ShortConv::forward`] does for `T = 1`, in the same order.
    fn step(
        &self,
        x: &[f32],
        history: &mut PositionCache,
        b: &mut StepBuffers,
        out: &mut [f32],
    ) -> Result<()> {
        let h = self.hidden;
        let bcx = &mut b.proj[..3 * h];
        self.in_proj.forward_vec(x, bcx)?;
        let (bc, xs) = bcx.split_at_mut(2 * h);
        let (bg, cg) = bc.split_at_mut(h);
        // u = B ⊙ x, kept in `bg`.
        for (u, &v) in bg.iter_mut().zip(xs.iter()) {
            *u *= v;
        }
        let past = self.kernel - 1;
        let start = history.len();
        let have = past.min(start);
        let earlier = history.rows(0, start - have, have)?;
        // conv = Σ_k taps[k] ⊙ ext[k], ext = [zeros.., the last `have` inputs, u].
        let conv = &mut b.conv[..h];
        for k in 0..self.kernel {
            let taps = &self.tap_values[k * h..(k + 1) * h];
            let src: Option<&[f32]> = if k == past {
                Some(bg)
            } else if k + have >= past {
                let j = k + have - past;
                Some(&earlier[j * h..(j + 1) * h])
            } else {
                None
            };
            match (k, src) {
                (0, Some(src)) => conv
                    .iter_mut()
                    .zip(src)
                    .zip(taps)
                    .for_each(|((c, &v), &t)| {
                        *c = v * t;
                    }),
                // Zero padding before the first position contributes nothing.
                (0, None) => conv.fill(0.0),
                (_, Some(src)) => conv
                    .iter_mut()
                    .zip(src)
                    .zip(taps)
                    .for_each(|((c, &v), &t)| {
                        *c += v * t;
                    }),
                (_, None) => {}
            }
        }
        if let Some(bias) = &self.bias_values {
            ops::add_assign(conv, bias);
        }
        history.push(bg)?;
        for (c, &v) in cg.iter_mut().zip(conv.iter()) {
            *c *= v;
        }
        self.out_proj.forward_vec(cg, out)
    }
}

/// Grouped-query attention with per-head RMSNorm on q and k before rotate-half RoPE.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, cfg: &Lfm2Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let q = cfg.num_attention_heads * hd;
        let kv = cfg.num_key_value_heads * hd;
        Ok(Self {
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), q, h, false)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), kv, h, false)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), kv, h, false)?,
            out_proj: Linear::load(w, &format!("{prefix}.out_proj"), h, q, false)?,
            q_norm: RmsNorm::load(w, &format!("{prefix}.q_layernorm"), hd, cfg.norm_eps)?,
            k_norm: RmsNorm::load(w, &format!("{prefix}.k_layernorm"), hd, cfg.norm_eps)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            window: cfg.sliding_window,
        })
    }

    /// `x`: `[T, hidden]` at positions `start..start+T`; the caches hold post-RoPE keys and values
    /// `[kv_heads, positions, head_dim]` of every earlier position and receive the new ones.
    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rotary: &(Tensor, Tensor),
        k_cache: &mut PositionCache,
        v_cache: &mut PositionCache,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let hd = self.head_dim;
        let heads_first = |y: Tensor, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let y = y.reshape((t, n, hd))?;
            let y = match norm {
                Some(norm) => norm.forward(&y)?,
                None => y,
            };
            Ok(y.transpose(0, 1)?.contiguous()?)
        };
        let (cos, sin) = rotary;
        let rope = |y: Tensor| -> Result<Tensor> {
            Ok(candle_nn::rotary_emb::rope(&y.unsqueeze(0)?, cos, sin)?.squeeze(0)?)
        };
        let q = rope(heads_first(
            self.q_proj.forward(x)?,
            self.heads,
            Some(&self.q_norm),
        )?)?;
        let k = rope(heads_first(
            self.k_proj.forward(x)?,
            self.kv_heads,
            Some(&self.k_norm),
        )?)?;
        let v = heads_first(self.v_proj.forward(x)?, self.kv_heads, None)?;
        k_cache.append(&k)?;
        v_cache.append(&v)?;
        if start >= ops::POOLED_ATTENTION_MIN {
            // After a long history each query attends on its own, as a decode step does: the
            // batched product below would build score tensors of heads × T × positions and
            // read the whole cache into new tensors, for every layer.
            let out = self.attend_each(&q, start, t, k_cache, v_cache)?;
            return self.out_proj.forward(&out);
        }

        // Keys visible to the first query: all earlier ones, or the last `window - 1` of them.
        let end = start + t;
        let first_key = match self.window {
            Some(w) => start.saturating_sub(w - 1),
            None => 0,
        };
        let n_keys = end - first_key;
        let keys = k_cache.range(first_key, n_keys)?;
        let values = v_cache.range(first_key, n_keys)?;

        // Query head h reads kv head h / group; heads of a group are adjacent, so the queries of
        // one kv head are a contiguous [group · T] block.
        let group = self.heads / self.kv_heads;
        let q = q.reshape((self.kv_heads, group * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?;
        let scores = scores.reshape((self.kv_heads, group, t, n_keys))?;
        let scores = match self.mask(start, t, first_key, n_keys)? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((
            self.kv_heads,
            group * t,
            n_keys,
        ))?;
        let out = probs.matmul(&values.contiguous()?)?; // [kv_heads, group·T, hd]
        let out = out
            .reshape((self.heads, t, hd))?
            .transpose(0, 1)?
            .reshape((t, self.heads * hd))?;
        self.out_proj.forward(&out)
    }

    /// Attention of the queries `q` (`[heads, T, head_dim]`, positions `start..start + T`, their
    /// keys and values already in the caches) one position at a time, with the decode step's
    /// [`ops::attend`] (shared over the pool for quantized weights). Returns `[T, heads ·
    /// head_dim]`.
    fn attend_each(
        &self,
        q: &Tensor,
        start: usize,
        t: usize,
        k_cache: &PositionCache,
        v_cache: &PositionCache,
    ) -> Result<Tensor> {
        let (hd, heads) = (self.head_dim, self.heads);
        let qv = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; t * heads * hd];
        let mut qi = vec![0f32; heads * hd];
        let mut scores = Vec::new();
        for (i, oi) in out.chunks_exact_mut(heads * hd).enumerate() {
            for (h, qh) in qi.chunks_exact_mut(hd).enumerate() {
                qh.copy_from_slice(&qv[(h * t + i) * hd..(h * t + i + 1) * hd]);
            }
            self.attend_position(&qi, start + i, k_cache, v_cache, &mut scores, oi)?;
        }
        Ok(Tensor::from_vec(out, (t, heads * hd), &Device::Cpu)?)
    }

    /// Attention of the query `q` (`[heads, head_dim]`) at `pos` over the cached keys it sees
    /// (all earlier ones, or the last `window - 1`), into `out`; quantized models share long
    /// contexts out over their pool, the exact f32 path stays on one thread (each head's
    /// numbers are the same either way). `scores` grows as needed.
    fn attend_position(
        &self,
        q: &[f32],
        pos: usize,
        k_cache: &PositionCache,
        v_cache: &PositionCache,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) -> Result<()> {
        let first_key = match self.window {
            Some(w) => pos.saturating_sub(w - 1),
            None => 0,
        };
        let n_keys = pos + 1 - first_key;
        if scores.len() < self.heads * n_keys {
            scores.resize((self.heads * n_keys).next_power_of_two(), 0.0);
        }
        // Checked once here; every head of both caches holds the same positions.
        k_cache.rows(0, first_key, n_keys)?;
        v_cache.rows(0, first_key, n_keys)?;
        let keys = |g| k_cache.rows(g, first_key, n_keys).unwrap_or(&[]);
        let values = |g| v_cache.rows(g, first_key, n_keys).unwrap_or(&[]);
        let (heads, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        match self.q_proj.pool() {
            Some(pool) => ops::attend_pooled(
                pool, q, heads, kv, hd, n_keys, keys, values, scale, scores, out,
            ),
            None => ops::attend(q, heads, kv, hd, n_keys, keys, values, scale, scores, out),
        }
        Ok(())
    }

    /// One position at `pos`: `x` is the normed input, the result goes to `out`; `b.cos` and
    /// `b.sin` hold the rotary table of `pos`.
    fn step(
        &self,
        x: &[f32],
        pos: usize,
        k_cache: &mut PositionCache,
        v_cache: &mut PositionCache,
        b: &mut StepBuffers,
        out: &mut [f32],
    ) -> Result<()> {
        let hd = self.head_dim;
        let (qn, kvn) = (self.heads * hd, self.kv_heads * hd);
        let q = &mut b.proj[..qn];
        forward_vec_many(
            &[&self.q_proj, &self.k_proj, &self.v_proj],
            x,
            &mut [q, &mut b.k[..kvn], &mut b.v[..kvn]],
        )?;
        self.q_norm.forward_heads(q);
        self.k_norm.forward_heads(&mut b.k[..kvn]);
        ops::rope_half(q, &b.cos, &b.sin);
        ops::rope_half(&mut b.k[..kvn], &b.cos, &b.sin);
        k_cache.push(&b.k[..kvn])?;
        v_cache.push(&b.v[..kvn])?;
        self.attend_position(q, pos, k_cache, v_cache, &mut b.scores, &mut b.attn[..qn])?;
        self.out_proj.forward_vec(&b.attn[..qn], out)
    }

    /// Additive mask `[T, n_keys]`: query at position `start + i` sees key `first_key + j` iff the
    /// key is not in the future and, with a window, `0 ≤ q − k < window`. `None` when all pass.
    fn mask(
        &self,
        start: usize,
        t: usize,
        first_key: usize,
        n_keys: usize,
    ) -> Result<Option<Tensor>> {
        let allowed = |qp: usize, kp: usize| kp <= qp && self.window.is_none_or(|w| qp - kp < w);
        let mut any_blocked = false;
        let mut m = Vec::with_capacity(t * n_keys);
        for i in 0..t {
            for j in 0..n_keys {
                let ok = allowed(start + i, first_key + j);
                any_blocked |= !ok;
                m.push(if ok { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        if !any_blocked {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(m, (t, n_keys), &Device::Cpu)?))
    }
}

#[derive(Debug, Clone)]
enum Operator {
    Conv(ShortConv),
    Attention(Attention),
}

#[derive(Debug, Clone)]
struct Layer {
    operator_norm: RmsNorm,
    operator: Operator,
    ffn_norm: RmsNorm,
    feed_forward: FeedForward,
}

/// The per-layer decode state of one sequence.
#[derive(Debug, Clone)]
enum LayerState {
    /// `B ⊙ x` of every position, `[positions, hidden]`.
    Conv(PositionCache),
    /// Post-RoPE keys and values, `[kv_heads, positions, head_dim]` each.
    Attention { k: PositionCache, v: PositionCache },
}

impl LayerState {
    fn truncate(&mut self, len: usize) {
        match self {
            LayerState::Conv(u) => u.truncate(len),
            LayerState::Attention { k, v } => {
                k.truncate(len);
                v.truncate(len);
            }
        }
    }
}

/// Everything an LFM2 stack remembers about the positions it has seen.
///
/// Every cache is indexed by position, so [`Lfm2State::truncate`] to `p` leaves exactly the state
/// that was computed for the first `p` positions.
#[derive(Debug, Clone)]
pub struct Lfm2State {
    layers: Vec<LayerState>,
    len: usize,
    /// Buffers of the single-position step, reused from step to step.
    buffers: StepBuffers,
}

/// The vectors one position goes through in [`Lfm2::step`], sized once for the stack.
#[derive(Debug, Clone, Default)]
struct StepBuffers {
    /// The residual stream.
    x: Vec<f32>,
    normed: Vec<f32>,
    /// The operator's input projection: `[B, C, x]` of a convolution, or the queries.
    proj: Vec<f32>,
    conv: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl StepBuffers {
    fn new(cfg: &Lfm2Config) -> Self {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let q = cfg.num_attention_heads * hd;
        let kv = cfg.num_key_value_heads * hd;
        Self {
            x: vec![0.0; h],
            normed: vec![0.0; h],
            proj: vec![0.0; (3 * h).max(q)],
            conv: vec![0.0; h],
            k: vec![0.0; kv],
            v: vec![0.0; kv],
            attn: vec![0.0; q],
            out: vec![0.0; h],
            gate: vec![0.0; cfg.ff_dim],
            up: vec![0.0; cfg.ff_dim],
            scores: vec![0.0; INITIAL_CAPACITY],
            cos: vec![0.0; hd / 2],
            sin: vec![0.0; hd / 2],
        }
    }
}

impl Lfm2State {
    /// Number of positions seen.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Views of every cache (conv inputs, keys, values), layer by layer, for inspection.
    pub fn caches(&self) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for layer in &self.layers {
            match layer {
                LayerState::Conv(u) => out.push(u.view()?),
                LayerState::Attention { k, v } => {
                    out.push(k.view()?);
                    out.push(v.view()?);
                }
            }
        }
        Ok(out)
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.truncate(len);
        }
        self.len = self.len.min(len);
    }

    /// Drops what is cached for positions before `pos`, keeping the numbering, to bound the
    /// memory of a long stream through a windowed stack: with a sliding window `w` and
    /// convolution kernel `k`, positions before `len() − max(w − 1, k − 1)` are never read again.
    /// Reading a forgotten position later (full attention, truncation before it) is an error.
    pub fn forget_before(&mut self, pos: usize) -> Result<()> {
        for layer in &mut self.layers {
            match layer {
                LayerState::Conv(u) => u.forget_before(pos)?,
                LayerState::Attention { k, v } => {
                    k.forget_before(pos)?;
                    v.forget_before(pos)?;
                }
            }
        }
        Ok(())
    }
}

/// A loaded LFM2 stack (without token embeddings).
#[derive(Debug, Clone)]
pub struct Lfm2 {
    cfg: Lfm2Config,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    rotary: Rotary,
}

impl Lfm2 {
    /// Loads the layers `{prefix}.layers.{i}.*` and the final norm `{prefix}.embedding_norm`.
    pub fn load(w: &Weights, prefix: &str, cfg: &Lfm2Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let mut layers = Vec::with_capacity(cfg.num_layers());
        for (i, kind) in cfg.layer_types.iter().enumerate() {
            let p = format!("{prefix}.layers.{i}");
            let operator = match kind {
                LayerKind::Conv => Operator::Conv(ShortConv::load(w, &format!("{p}.conv"), cfg)?),
                LayerKind::Attention => {
                    Operator::Attention(Attention::load(w, &format!("{p}.self_attn"), cfg)?)
                }
            };
            layers.push(Layer {
                operator_norm: RmsNorm::load(w, &format!("{p}.operator_norm"), h, cfg.norm_eps)?,
                operator,
                ffn_norm: RmsNorm::load(w, &format!("{p}.ffn_norm"), h, cfg.norm_eps)?,
                feed_forward: FeedForward::load(w, &format!("{p}.feed_forward"), h, cfg.ff_dim)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            layers,
            final_norm: RmsNorm::load(w, &format!("{prefix}.embedding_norm"), h, cfg.norm_eps)?,
            rotary: Rotary::new(cfg.head_dim(), cfg.rope_theta),
        })
    }

    pub fn config(&self) -> &Lfm2Config {
        &self.cfg
    }

    /// Bytes of the layer weights (quantized or f32).
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let ops = match &l.operator {
                    Operator::Conv(c) => c.in_proj.weight_bytes() + c.out_proj.weight_bytes(),
                    Operator::Attention(a) => {
                        a.q_proj.weight_bytes()
                            + a.k_proj.weight_bytes()
                            + a.v_proj.weight_bytes()
                            + a.out_proj.weight_bytes()
                    }
                };
                ops + l.feed_forward.weight_bytes()
            })
            .sum()
    }

    /// How far back a position is ever read: `max(window − 1, kernel − 1)` with a sliding window,
    /// `None` (everything) with full attention.
    pub fn lookback(&self) -> Option<usize> {
        let conv = self.cfg.conv_kernel.saturating_sub(1);
        if !self.cfg.layer_types.contains(&LayerKind::Attention) {
            return Some(conv);
        }
        self.cfg
            .sliding_window
            .map(|w| w.saturating_sub(1).max(conv))
    }

    /// A fresh state with no positions.
    pub fn new_state(&self) -> Result<Lfm2State> {
        let h = self.cfg.hidden_size;
        let kv = self.cfg.num_key_value_heads;
        let hd = self.cfg.head_dim();
        let layers = self
            .cfg
            .layer_types
            .iter()
            .map(|kind| {
                Ok(match kind {
                    LayerKind::Conv => {
                        LayerState::Conv(PositionCache::new(&[0, h], 0, INITIAL_CAPACITY)?)
                    }
                    LayerKind::Attention => LayerState::Attention {
                        k: PositionCache::new(&[kv, 0, hd], 1, INITIAL_CAPACITY)?,
                        v: PositionCache::new(&[kv, 0, hd], 1, INITIAL_CAPACITY)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Lfm2State {
            layers,
            len: 0,
            buffers: StepBuffers::new(&self.cfg),
        })
    }

    /// Runs `x` (`[T, hidden]`) at the next positions of `state` and returns the final-normed
    /// hidden states `[T, hidden]`.
    pub fn forward(&self, x: &Tensor, state: &mut Lfm2State) -> Result<Tensor> {
        self.forward_inner(x, state, None, &crate::error::never)
    }

    /// As [`Lfm2::forward`], stopping between two layers when `stop` says so
    /// ([`Error::Stopped`]); the state is then as it was before.
    pub fn forward_until(&self, x: &Tensor, state: &mut Lfm2State, stop: Stop) -> Result<Tensor> {
        self.forward_inner(x, state, None, stop)
    }

    /// As [`Lfm2::forward`], also returning the residual stream after each layer (before the
    /// final norm).
    pub fn forward_with_layers(
        &self,
        x: &Tensor,
        state: &mut Lfm2State,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut outs = Vec::with_capacity(self.layers.len());
        let y = self.forward_inner(x, state, Some(&mut outs), &crate::error::never)?;
        Ok((y, outs))
    }

    fn forward_inner(
        &self,
        x: &Tensor,
        state: &mut Lfm2State,
        outs: Option<&mut Vec<Tensor>>,
        stop: Stop,
    ) -> Result<Tensor> {
        let start = state.len;
        let result = self.forward_layers(x, state, outs, stop);
        if result.is_err() {
            // A failure (or a stop) part-way must not leave some layers one step ahead of the
            // others.
            state.truncate(start);
        }
        result
    }

    fn forward_layers(
        &self,
        x: &Tensor,
        state: &mut Lfm2State,
        mut outs: Option<&mut Vec<Tensor>>,
        stop: Stop,
    ) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        if h != self.cfg.hidden_size {
            return Err(Error::Invalid(format!(
                "input width {h} does not match the model width {}",
                self.cfg.hidden_size
            )));
        }
        if t == 0 {
            return Ok(x.clone());
        }
        if state.layers.len() != self.layers.len() {
            return Err(Error::Invalid(
                "the state belongs to a different model".into(),
            ));
        }
        if t == 1 && outs.is_none() {
            return self.step(x, state);
        }
        let start = state.len;
        let needs_rotary = self.cfg.layer_types.contains(&LayerKind::Attention);
        let rotary = if needs_rotary {
            Some(self.rotary.tables(start, t)?)
        } else {
            None
        };
        let mut x = x.contiguous()?;
        for (layer, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
            if stop() {
                return Err(Error::Stopped);
            }
            let normed = layer.operator_norm.forward(&x)?;
            let op = match (&layer.operator, layer_state) {
                (Operator::Conv(conv), LayerState::Conv(history)) => {
                    conv.forward(&normed, history)?
                }
                (Operator::Attention(attn), LayerState::Attention { k, v }) => attn.forward(
                    &normed,
                    start,
                    rotary.as_ref().expect("attention has tables"),
                    k,
                    v,
                )?,
                _ => {
                    return Err(Error::Invalid(
                        "the state belongs to a different model".into(),
                    ))
                }
            };
            let hmid = (x + op)?;
            let ff = layer
                .feed_forward
                .forward(&layer.ffn_norm.forward(&hmid)?)?;
            x = (hmid + ff)?;
            if let Some(outs) = outs.as_deref_mut() {
                outs.push(x.clone());
            }
        }
        state.len += t;
        self.final_norm.forward(&x)
    }

    /// One position (`x`: `[1, hidden]`) on plain slices: the decode step. Computes what the
    /// batched path computes for `T = 1`, in the state's buffers, and allocates only the
    /// returned tensor.
    fn step(&self, x: &Tensor, state: &mut Lfm2State) -> Result<Tensor> {
        let pos = state.len;
        let b = &mut state.buffers;
        let x = x.contiguous()?;
        with_f32_slice(&x, |xs| {
            b.x.copy_from_slice(xs);
            Ok(())
        })?;
        if self.cfg.layer_types.contains(&LayerKind::Attention) {
            self.rotary.fill(pos, &mut b.cos, &mut b.sin);
        }
        for (layer, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
            // The operator reads `normed` and writes `out` while using the other buffers.
            let (mut normed, mut out) = (std::mem::take(&mut b.normed), std::mem::take(&mut b.out));
            layer.operator_norm.forward_vec(&b.x, &mut normed);
            let done = match (&layer.operator, layer_state) {
                (Operator::Conv(conv), LayerState::Conv(history)) => {
                    conv.step(&normed, history, b, &mut out)
                }
                (Operator::Attention(attn), LayerState::Attention { k, v }) => {
                    attn.step(&normed, pos, k, v, b, &mut out)
                }
                _ => Err(Error::Invalid(
                    "the state belongs to a different model".into(),
                )),
            };
            if let Err(e) = done {
                (b.normed, b.out) = (normed, out);
                return Err(e);
            }
            ops::add_assign(&mut b.x, &out);
            layer.ffn_norm.forward_vec(&b.x, &mut normed);
            let ff = layer
                .feed_forward
                .forward_vec(&normed, &mut b.gate, &mut b.up, &mut out);
            ops::add_assign(&mut b.x, &out);
            (b.normed, b.out) = (normed, out);
            ff?;
        }
        state.len += 1;
        self.final_norm.forward_vec(&b.x, &mut b.normed);
        Ok(Tensor::from_slice(
            &b.normed,
            (1, b.normed.len()),
            &Device::Cpu,
        )?)
    }
}
