//! The audio encoder's network: FastConformer (dw-striding ×8 subsampling, relative-position
//! self-attention, convolution module, macaron feed-forwards) and the MLP adapter that maps its
//! outputs into the backbone's embedding space. One clip in, `ceil(T_mel / 8)` embeddings out.
//!
//! The encoder sees the whole clip at once (bidirectional attention), as the reference does.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use crate::config::Reader;
use crate::error::{Error, Result, Stop};
use crate::nn::{LayerNorm, Linear};
use crate::weights::{WeightClass, Weights};

/// Epsilon of every LayerNorm and BatchNorm of the encoder and adapter.
const NORM_EPS: f64 = 1e-5;

/// The `encoder` section of `config.json`, validated against what the reference can run.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub feat_in: usize,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub ff_expansion_factor: usize,
    pub subsampling_factor: usize,
    pub subsampling_conv_channels: usize,
    pub conv_kernel_size: usize,
}

impl EncoderConfig {
    pub fn from_json(obj: &Map<String, Value>, path: &Path) -> Result<Self> {
        let r = Reader {
            obj,
            path,
            prefix: "encoder",
        };
        let feat_in = r.usize_or("feat_in", 128)?;
        r.check(
            feat_in == 128,
            "feat_in",
            "the mel front-end gives 128 features",
        )?;
        let d_model = r.usize_req("d_model")?;
        let n_heads = r.usize_req("n_heads")?;
        r.check(
            d_model > 0 && n_heads > 0 && d_model % n_heads == 0,
            "n_heads",
            "must divide d_model",
        )?;
        r.check(
            d_model % 2 == 0,
            "d_model",
            "must be even (sinusoidal positions)",
        )?;
        let n_layers = r.usize_req("n_layers")?;
        let ff_expansion_factor = r.usize_or("ff_expansion_factor", 4)?;
        r.check(
            ff_expansion_factor > 0,
            "ff_expansion_factor",
            "must be positive",
        )?;
        let subsampling = obj
            .get("subsampling")
            .and_then(|v| v.as_str())
            .unwrap_or("dw_striding");
        r.check(
            subsampling == "dw_striding",
            "subsampling",
            &format!("only \"dw_striding\" is supported, got {subsampling:?}"),
        )?;
        let subsampling_factor = r.usize_or("subsampling_factor", 8)?;
        r.check(
            subsampling_factor >= 2 && subsampling_factor.is_power_of_two(),
            "subsampling_factor",
            "must be a power of two, at least 2",
        )?;
        let subsampling_conv_channels = r.usize_req("subsampling_conv_channels")?;
        r.check(
            subsampling_conv_channels > 0,
            "subsampling_conv_channels",
            "must be positive",
        )?;
        let conv_kernel_size = r.usize_or("conv_kernel_size", 9)?;
        r.check(
            conv_kernel_size % 2 == 1,
            "conv_kernel_size",
            "must be odd (symmetric padding)",
        )?;
        let attention = obj
            .get("self_attention_model")
            .and_then(|v| v.as_str())
            .unwrap_or("rel_pos");
        r.check(
            attention == "rel_pos",
            "self_attention_model",
            &format!("only \"rel_pos\" is supported, got {attention:?}"),
        )?;
        if let Some(ctx) = obj.get("att_context_size").filter(|v| !v.is_null()) {
            r.check(
                ctx == &serde_json::json!([-1, -1]),
                "att_context_size",
                &format!("only [-1, -1] (full context) is supported, got {ctx}"),
            )?;
        }
        r.check(
            !r.bool_or("xscaling", false)?,
            "xscaling",
            "must be false (the reference cannot run it)",
        )?;
        r.check(
            r.bool_or("untie_biases", true)?,
            "untie_biases",
            "must be true (per-layer position biases)",
        )?;
        r.check(
            !r.bool_or("causal_downsampling", false)?,
            "causal_downsampling",
            "must be false",
        )?;
        if let Some(norm) = obj.get("conv_norm_type").filter(|v| !v.is_null()) {
            r.check(
                norm.as_str() == Some("batch_norm"),
                "conv_norm_type",
                &format!("only \"batch_norm\" is supported, got {norm}"),
            )?;
        }
        r.check(
            !r.has("conv_context_size"),
            "conv_context_size",
            "only null (symmetric padding) is supported",
        )?;
        r.check(!r.has("reduction"), "reduction", "only null is supported")?;
        if let Some(out) = obj.get("feat_out").filter(|v| !v.is_null()) {
            r.check(
                out.as_i64() == Some(-1),
                "feat_out",
                "only -1 (no output projection) is supported",
            )?;
        }
        Ok(Self {
            feat_in,
            n_layers,
            d_model,
            n_heads,
            ff_expansion_factor,
            subsampling_factor,
            subsampling_conv_channels,
            conv_kernel_size,
        })
    }

    /// Encoder positions for `mel_frames` frames: each stride-2 stage maps n to ceil(n/2).
    pub fn output_len(&self, mel_frames: usize) -> usize {
        let mut n = mel_frames;
        let mut f = self.subsampling_factor;
        while f > 1 {
            n = n.div_ceil(2);
            f /= 2;
        }
        n
    }
}

/// A 3×3, stride-2, padding-1 convolution over `[channels][time][freq]` with channel groups.
#[derive(Debug, Clone)]
struct Conv3x3 {
    /// `[c_out][c_in / groups][3][3]`
    weight: Vec<f32>,
    bias: Vec<f32>,
    c_in: usize,
    c_out: usize,
    groups: usize,
}

impl Conv3x3 {
    fn load(w: &Weights, name: &str, c_in: usize, c_out: usize, groups: usize) -> Result<Self> {
        let weight = w
            .get(&format!("{name}.weight"), &[c_out, c_in / groups, 3, 3])?
            .flatten_all()?
            .to_vec1()?;
        let bias = w.get(&format!("{name}.bias"), &[c_out])?.to_vec1()?;
        Ok(Self {
            weight,
            bias,
            c_in,
            c_out,
            groups,
        })
    }

    /// `input` is `[c_in][h][w]`; returns `[c_out][ceil(h/2)][ceil(w/2)]` and the new sizes.
    ///
    /// Each input plane is first laid out as `[h][3][wo]`: for every row, the values at columns
    /// `2j - 1`, `2j` and `2j + 1` (zero outside the plane) as three contiguous rows, so that the
    /// products run over contiguous memory and vectorize (the stride-2 gathers of the direct loop
    /// did not). Every output value gets the same terms added in the same order as in
    /// [`Conv3x3::forward_direct`]: the same bits.
    fn forward(&self, input: &[f32], h: usize, w: usize, relu: bool) -> (Vec<f32>, usize, usize) {
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        let in_per_group = self.c_in / self.groups;
        let out_per_group = self.c_out / self.groups;
        let mut out = vec![0f32; self.c_out * ho * wo];
        for (oc, plane) in out.chunks_exact_mut(ho * wo).enumerate() {
            plane.fill(self.bias[oc]);
        }
        let mut cols = vec![0f32; h * 3 * wo];
        for g in 0..self.groups {
            for ic in 0..in_per_group {
                let src = &input[(g * in_per_group + ic) * h * w..][..h * w];
                for (r, row) in src.chunks_exact(w).enumerate() {
                    for dj in 0..3 {
                        let dst = &mut cols[(r * 3 + dj) * wo..][..wo];
                        for (j, d) in dst.iter_mut().enumerate() {
                            *d = match (2 * j + dj).checked_sub(1) {
                                Some(c) if c < w => row[c],
                                _ => 0.0,
                            };
                        }
                    }
                }
                for oc in g * out_per_group..(g + 1) * out_per_group {
                    let k = &self.weight[(oc * in_per_group + ic) * 9..][..9];
                    let plane = &mut out[oc * ho * wo..(oc + 1) * ho * wo];
                    for (i, dst) in plane.chunks_exact_mut(wo).enumerate() {
                        for di in 0..3 {
                            // Input row 2i − 1 + di (padding 1).
                            let Some(r) = (2 * i + di).checked_sub(1).filter(|&r| r < h) else {
                                continue;
                            };
                            let taps = &cols[r * 3 * wo..][..3 * wo];
                            let (c0, rest) = taps.split_at(wo);
                            let (c1, c2) = rest.split_at(wo);
                            let (k0, k1, k2) = (k[di * 3], k[di * 3 + 1], k[di * 3 + 2]);
                            for (((d, &a), &b), &c) in dst.iter_mut().zip(c0).zip(c1).zip(c2) {
                                let mut acc = 0f32;
                                acc += k0 * a;
                                acc += k1 * b;
                                acc += k2 * c;
                                *d += acc;
                            }
                        }
                    }
                }
            }
        }
        if relu {
            out.iter_mut().for_each(|x| *x = x.max(0.0));
        }
        (out, ho, wo)
    }

    /// The direct loop [`Conv3x3::forward`] is checked against.
    #[cfg(test)]
    fn forward_direct(
        &self,
        input: &[f32],
        h: usize,
        w: usize,
        relu: bool,
    ) -> (Vec<f32>, usize, usize) {
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        let in_per_group = self.c_in / self.groups;
        let out_per_group = self.c_out / self.groups;
        let mut out = vec![0f32; self.c_out * ho * wo];
        for oc in 0..self.c_out {
            let g = oc / out_per_group;
            let plane = &mut out[oc * ho * wo..(oc + 1) * ho * wo];
            plane.fill(self.bias[oc]);
            for ic in 0..in_per_group {
                let src = &input[(g * in_per_group + ic) * h * w..][..h * w];
                let k = &self.weight[(oc * in_per_group + ic) * 9..][..9];
                for i in 0..ho {
                    for di in 0..3 {
                        let Some(r) = (2 * i + di).checked_sub(1).filter(|&r| r < h) else {
                            continue;
                        };
                        let row = &src[r * w..(r + 1) * w];
                        let dst = &mut plane[i * wo..(i + 1) * wo];
                        for (j, d) in dst.iter_mut().enumerate() {
                            let mut acc = 0f32;
                            for dj in 0..3 {
                                if let Some(c) = (2 * j + dj).checked_sub(1).filter(|&c| c < w) {
                                    acc += k[di * 3 + dj] * row[c];
                                }
                            }
                            *d += acc;
                        }
                    }
                }
            }
            if relu {
                plane.iter_mut().for_each(|x| *x = x.max(0.0));
            }
        }
        (out, ho, wo)
    }
}

/// `dw_striding` subsampling: a full 3×3 stride-2 convolution, then (depthwise 3×3 stride 2,
/// pointwise 1×1) pairs, each stage followed by ReLU; flattened as `c·F + f` and projected.
#[derive(Debug, Clone)]
struct Subsampling {
    first: Conv3x3,
    /// (depthwise, pointwise weight `[C, C]`, pointwise bias `[C]`)
    stages: Vec<(Conv3x3, Tensor, Tensor)>,
    out: Linear,
    channels: usize,
}

impl Subsampling {
    fn load(w: &Weights, cfg: &EncoderConfig) -> Result<Self> {
        let c = cfg.subsampling_conv_channels;
        let p = "conformer.pre_encode";
        let first = Conv3x3::load(w, &format!("{p}.conv.0"), 1, c, 1)?;
        let n_stages = cfg.subsampling_factor.trailing_zeros() as usize;
        let mut stages = Vec::new();
        let mut freq = cfg.feat_in;
        freq = freq.div_ceil(2);
        for s in 1..n_stages {
            // Module indices: 0 conv, 1 ReLU, then per stage: depthwise, pointwise, ReLU.
            let dw = Conv3x3::load(w, &format!("{p}.conv.{}", 3 * s - 1), c, c, c)?;
            let pw_w = w
                .get(&format!("{p}.conv.{}.weight", 3 * s), &[c, c, 1, 1])?
                .reshape((c, c))?;
            let pw_b = w.get(&format!("{p}.conv.{}.bias", 3 * s), &[c])?;
            stages.push((dw, pw_w, pw_b));
            freq = freq.div_ceil(2);
        }
        let out = Linear::load_class(
            w,
            &format!("{p}.out"),
            cfg.d_model,
            c * freq,
            true,
            WeightClass::Auxiliary,
        )?;
        Ok(Self {
            first,
            stages,
            out,
            channels: c,
        })
    }

    /// `mel` `[128, T]` → `[T', d_model]`.
    fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let (feats, t) = mel.dims2()?;
        // The reference lays the mel out as (time, freq): time is the conv's height.
        let input = mel.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (mut x, mut h, mut w) = self.first.forward(&input, t, feats, true);
        let c = self.channels;
        for (dw, pw_w, pw_b) in &self.stages {
            let (y, ho, wo) = dw.forward(&x, h, w, false);
            let y = Tensor::from_vec(y, (c, ho * wo), &Device::Cpu)?;
            let z = pw_w
                .matmul(&y)?
                .broadcast_add(&pw_b.unsqueeze(1)?)?
                .relu()?;
            x = z.flatten_all()?.to_vec1()?;
            (h, w) = (ho, wo);
        }
        // [C, T', F'] → [T', C·F'] with index c·F' + f.
        let x = Tensor::from_vec(x, (c, h, w), &Device::Cpu)?
            .transpose(0, 1)?
            .reshape((h, c * w))?;
        self.out.forward(&x)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    linear1: Linear,
    linear2: Linear,
}

impl FeedForward {
    fn load(w: &Weights, name: &str, d: usize, ff: usize) -> Result<Self> {
        Ok(Self {
            linear1: Linear::load_class(
                w,
                &format!("{name}.linear1"),
                ff,
                d,
                true,
                WeightClass::Auxiliary,
            )?,
            linear2: Linear::load_class(
                w,
                &format!("{name}.linear2"),
                d,
                ff,
                true,
                WeightClass::Auxiliary,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear2
            .forward(&candle_nn::ops::silu(&self.linear1.forward(x)?)?)
    }
}

/// Multi-head self-attention with Transformer-XL relative positions:
/// `score[h,i,j] = ((q_i + u_h)·k_j + (q_i + v_h)·p_{i−j}) / √d_k`.
#[derive(Debug, Clone)]
struct RelPosAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    pos: Linear,
    /// `[heads, 1, d_k]`
    bias_u: Tensor,
    bias_v: Tensor,
    heads: usize,
    d_k: usize,
}

impl RelPosAttention {
    fn load(w: &Weights, name: &str, d: usize, heads: usize) -> Result<Self> {
        let d_k = d / heads;
        Ok(Self {
            q: Linear::load_class(
                w,
                &format!("{name}.linear_q"),
                d,
                d,
                true,
                WeightClass::Auxiliary,
            )?,
            k: Linear::load_class(
                w,
                &format!("{name}.linear_k"),
                d,
                d,
                true,
                WeightClass::Auxiliary,
            )?,
            v: Linear::load_class(
                w,
                &format!("{name}.linear_v"),
                d,
                d,
                true,
                WeightClass::Auxiliary,
            )?,
            out: Linear::load_class(
                w,
                &format!("{name}.linear_out"),
                d,
                d,
                true,
                WeightClass::Auxiliary,
            )?,
            pos: Linear::load_class(
                w,
                &format!("{name}.linear_pos"),
                d,
                d,
                false,
                WeightClass::Auxiliary,
            )?,
            bias_u: w
                .get(&format!("{name}.pos_bias_u"), &[heads, d_k])?
                .unsqueeze(1)?,
            bias_v: w
                .get(&format!("{name}.pos_bias_v"), &[heads, d_k])?
                .unsqueeze(1)?,
            heads,
            d_k,
        })
    }

    /// `x` `[T, d]`, `pos_emb` `[2T − 1, d]` for relative positions T−1 … −(T−1).
    fn forward(&self, x: &Tensor, pos_emb: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (h, dk) = (self.heads, self.d_k);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((n, h, dk))?.transpose(0, 1)?.contiguous()?)
        };
        let q = heads(self.q.forward(x)?, t)?;
        let k = heads(self.k.forward(x)?, t)?;
        let v = heads(self.v.forward(x)?, t)?;
        let p = heads(self.pos.forward(pos_emb)?, 2 * t - 1)?;
        let ac = q.broadcast_add(&self.bias_u)?.matmul(&k.t()?)?; // [h, T, T]
        let bd_full = q.broadcast_add(&self.bias_v)?.matmul(&p.t()?)?; // [h, T, 2T−1]
                                                                       // rel-shift: bd[h,i,j] = bd_full[h,i,T−1−i+j], by padding a zero column on the left and
                                                                       // re-reading the rows one place down.
        let bd = bd_full
            .pad_with_zeros(2, 1, 0)?
            .reshape((h, 2 * t, t))?
            .narrow(1, 1, 2 * t - 1)?
            .contiguous()?
            .reshape((h, t, 2 * t - 1))?
            .narrow(2, 0, t)?;
        let scores = ((ac + bd)? / (dk as f64).sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?;
        let y = probs.matmul(&v)?.transpose(0, 1)?.reshape((t, h * dk))?;
        self.out.forward(&y)
    }
}

/// Pointwise conv + GLU, depthwise conv over time (symmetric zero padding), BatchNorm (folded),
/// SiLU, pointwise conv.
#[derive(Debug, Clone)]
struct ConvModule {
    pointwise1: Linear,
    /// `[kernel, d]`: tap k multiplies input `t − (kernel−1)/2 + k`.
    depthwise: Tensor,
    /// BatchNorm folded into the depthwise conv: `y = conv · scale + shift`.
    scale: Tensor,
    shift: Tensor,
    pointwise2: Linear,
    d: usize,
    kernel: usize,
}

impl ConvModule {
    fn load(w: &Weights, name: &str, d: usize, kernel: usize) -> Result<Self> {
        // The 1×1 convolutions are linear maps over channels: stored [out, in, 1].
        let pointwise = |conv: &str, out: usize, bias: Tensor| {
            let wname = format!("{name}.{conv}.weight");
            Linear::from_matrix(
                w,
                &wname,
                out,
                d,
                Some(bias),
                WeightClass::Auxiliary,
                || Ok(w.get(&wname, &[out, d, 1])?.reshape((out, d))?),
            )
        };
        let pw1_b = w.get(&format!("{name}.pointwise_conv1.bias"), &[2 * d])?;
        let dw = w
            .get(&format!("{name}.depthwise_conv.weight"), &[d, 1, kernel])?
            .reshape((d, kernel))?;
        let dw_b = w.get(&format!("{name}.depthwise_conv.bias"), &[d])?;
        let bn = |p: &str| w.get(&format!("{name}.batch_norm.{p}"), &[d]);
        let (gamma, beta, mean, var) = (
            bn("weight")?,
            bn("bias")?,
            bn("running_mean")?,
            bn("running_var")?,
        );
        // (conv + b − mean)/√(var + eps)·γ + β = conv·a + ((b − mean)·a + β), a = γ/√(var + eps).
        let scale = gamma.broadcast_div(&(var + NORM_EPS)?.sqrt()?)?;
        let shift = ((dw_b - mean)? * &scale)?.add(&beta)?;
        let pw2_b = w.get(&format!("{name}.pointwise_conv2.bias"), &[d])?;
        Ok(Self {
            pointwise1: pointwise("pointwise_conv1", 2 * d, pw1_b)?,
            depthwise: dw.t()?.contiguous()?,
            scale,
            shift,
            pointwise2: pointwise("pointwise_conv2", d, pw2_b)?,
            d,
            kernel,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let y = self.pointwise1.forward(x)?;
        let glu =
            (y.narrow(1, 0, self.d)? * candle_nn::ops::sigmoid(&y.narrow(1, self.d, self.d)?)?)?;
        let half = (self.kernel - 1) / 2;
        let padded = glu.pad_with_zeros(0, half, half)?;
        let mut conv = padded
            .narrow(0, 0, t)?
            .broadcast_mul(&self.depthwise.get(0)?)?;
        for k in 1..self.kernel {
            conv = (conv
                + padded
                    .narrow(0, k, t)?
                    .broadcast_mul(&self.depthwise.get(k)?)?)?;
        }
        let normed = conv
            .broadcast_mul(&self.scale)?
            .broadcast_add(&self.shift)?;
        self.pointwise2.forward(&candle_nn::ops::silu(&normed)?)
    }
}

#[derive(Debug, Clone)]
struct ConformerLayer {
    norm_ff1: LayerNorm,
    ff1: FeedForward,
    norm_att: LayerNorm,
    attn: RelPosAttention,
    norm_conv: LayerNorm,
    conv: ConvModule,
    norm_ff2: LayerNorm,
    ff2: FeedForward,
    norm_out: LayerNorm,
}

impl ConformerLayer {
    fn load(w: &Weights, i: usize, cfg: &EncoderConfig) -> Result<Self> {
        let p = format!("conformer.layers.{i}");
        let d = cfg.d_model;
        let ff = d * cfg.ff_expansion_factor;
        Ok(Self {
            norm_ff1: LayerNorm::load(w, &format!("{p}.norm_feed_forward1"), d, NORM_EPS)?,
            ff1: FeedForward::load(w, &format!("{p}.feed_forward1"), d, ff)?,
            norm_att: LayerNorm::load(w, &format!("{p}.norm_self_att"), d, NORM_EPS)?,
            attn: RelPosAttention::load(w, &format!("{p}.self_attn"), d, cfg.n_heads)?,
            norm_conv: LayerNorm::load(w, &format!("{p}.norm_conv"), d, NORM_EPS)?,
            conv: ConvModule::load(w, &format!("{p}.conv"), d, cfg.conv_kernel_size)?,
            norm_ff2: LayerNorm::load(w, &format!("{p}.norm_feed_forward2"), d, NORM_EPS)?,
            ff2: FeedForward::load(w, &format!("{p}.feed_forward2"), d, ff)?,
            norm_out: LayerNorm::load(w, &format!("{p}.norm_out"), d, NORM_EPS)?,
        })
    }

    fn forward(&self, x: &Tensor, pos_emb: &Tensor) -> Result<Tensor> {
        let x = (x + (self.ff1.forward(&self.norm_ff1.forward(x)?)? * 0.5)?)?;
        let x = (&x + self.attn.forward(&self.norm_att.forward(&x)?, pos_emb)?)?;
        let x = (&x + self.conv.forward(&self.norm_conv.forward(&x)?)?)?;
        let x = (&x + (self.ff2.forward(&self.norm_ff2.forward(&x)?)? * 0.5)?)?;
        self.norm_out.forward(&x)
    }
}

/// The FastConformer encoder.
#[derive(Debug, Clone)]
pub struct Conformer {
    cfg: EncoderConfig,
    subsampling: Subsampling,
    layers: Vec<ConformerLayer>,
}

impl Conformer {
    pub fn load(w: &Weights, cfg: &EncoderConfig) -> Result<Self> {
        let subsampling = Subsampling::load(w, cfg)?;
        let layers = (0..cfg.n_layers)
            .map(|i| ConformerLayer::load(w, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            subsampling,
            layers,
        })
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// Sinusoidal table `[2T − 1, d]` for relative positions T−1, T−2, …, −(T−1), in f32 as the
    /// reference computes it: `pe[2i] = sin(pos·e^{−2i·ln(10⁴)/d})`, `pe[2i+1] = cos(…)`.
    pub fn relative_positions(&self, t: usize) -> Result<Tensor> {
        let d = self.cfg.d_model;
        let factor = -(10000f64.ln() / d as f64) as f32;
        let div: Vec<f32> = (0..d / 2)
            .map(|i| ((2 * i) as f32 * factor).exp())
            .collect();
        let mut pe = Vec::with_capacity((2 * t - 1) * d);
        for k in 0..2 * t - 1 {
            let pos = (t as i64 - 1 - k as i64) as f32;
            for &f in &div {
                pe.push((pos * f).sin());
                pe.push((pos * f).cos());
            }
        }
        Ok(Tensor::from_vec(pe, (2 * t - 1, d), &Device::Cpu)?)
    }

    /// Encodes a mel spectrogram `[128, T]` into `[ceil(T/8), d_model]`.
    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        self.forward_until(mel, &crate::error::never)
    }

    /// As [`Conformer::forward`], stopping between two layers when `stop` says so.
    pub fn forward_until(&self, mel: &Tensor, stop: Stop) -> Result<Tensor> {
        Ok(self.run(mel, stop, None)?.0)
    }

    /// As [`Conformer::forward`], also returning the subsampling output and each layer's output.
    pub fn forward_with_layers(&self, mel: &Tensor) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
        let mut outs = Vec::with_capacity(self.layers.len());
        let (x, sub) = self.run(mel, &crate::error::never, Some(&mut outs))?;
        Ok((x, sub, outs))
    }

    fn run(
        &self,
        mel: &Tensor,
        stop: Stop,
        mut outs: Option<&mut Vec<Tensor>>,
    ) -> Result<(Tensor, Tensor)> {
        let (feats, t) = mel.dims2()?;
        if feats != self.cfg.feat_in {
            return Err(Error::Invalid(format!(
                "the encoder takes {} mel features, got {feats}",
                self.cfg.feat_in
            )));
        }
        if t == 0 {
            return Err(Error::Invalid(
                "cannot encode an empty mel spectrogram".into(),
            ));
        }
        if stop() {
            return Err(Error::Stopped);
        }
        let sub = self.subsampling.forward(mel)?;
        let pos = self.relative_positions(sub.dim(0)?)?;
        let mut x = sub.clone();
        for layer in &self.layers {
            if stop() {
                return Err(Error::Stopped);
            }
            x = layer.forward(&x, &pos)?;
            if let Some(outs) = outs.as_deref_mut() {
                outs.push(x.clone());
            }
        }
        Ok((x, sub))
    }
}

/// `LayerNorm → Linear → GELU (erf) → Linear`: encoder vectors to backbone embeddings.
#[derive(Debug, Clone)]
pub struct AudioAdapter {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl AudioAdapter {
    pub fn load(w: &Weights, d_model: usize, hidden: usize) -> Result<Self> {
        let p = "audio_adapter.model";
        let shape = w.shape(&format!("{p}.1.weight"))?;
        let inner = shape.first().copied().unwrap_or(0);
        Ok(Self {
            norm: LayerNorm::load(w, &format!("{p}.0"), d_model, NORM_EPS)?,
            fc1: Linear::load_class(
                w,
                &format!("{p}.1"),
                inner,
                d_model,
                true,
                WeightClass::Auxiliary,
            )?,
            fc2: Linear::load_class(
                w,
                &format!("{p}.3"),
                hidden,
                inner,
                true,
                WeightClass::Auxiliary,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.fc1.forward(&self.norm.forward(x)?)?.gelu_erf()?;
        self.fc2.forward(&y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// The laid-out convolution gives the same bits as the direct loop: a full one from one
    /// plane (the first subsampling stage) and a depthwise one, on even and odd sizes (the
    /// padding at every edge), with and without ReLU.
    #[test]
    fn laid_out_conv3x3_equals_the_direct_loop() {
        for &(c_in, c_out, groups) in &[(1, 8, 1), (6, 6, 6), (4, 6, 2)] {
            for &(h, w) in &[(1, 1), (2, 3), (7, 5), (16, 9), (33, 128)] {
                let conv = Conv3x3 {
                    weight: values(c_out * (c_in / groups) * 9, 11 + h as u64),
                    bias: values(c_out, 5),
                    c_in,
                    c_out,
                    groups,
                };
                let input = values(c_in * h * w, 3 + w as u64);
                for relu in [false, true] {
                    let got = conv.forward(&input, h, w, relu);
                    let want = conv.forward_direct(&input, h, w, relu);
                    assert_eq!((got.1, got.2), (want.1, want.2));
                    let same = got
                        .0
                        .iter()
                        .zip(&want.0)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same && got.0.len() == want.0.len(),
                        "{c_in}->{c_out}/{groups} on {h}x{w}, relu {relu}"
                    );
                }
            }
        }
    }
}
