//! Normalisations over the last axis: RMSNorm (the LFM2 stack, the depthformer) and LayerNorm
//! with affine weight and bias (the conformer, Mimi).

use candle_core::Tensor;

use crate::error::Result;
use crate::weights::Weights;

/// `w ⊙ x · rsqrt(mean(x²) + eps)` over the last axis.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// The same weights as a slice, for [`RmsNorm::forward_vec`].
    values: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), &[dim])?;
        Ok(Self {
            values: weight.to_vec1::<f32>()?,
            weight,
            eps: eps as f32,
        })
    }

    /// The norm of one vector: `out = w ⊙ x · rsqrt(mean(x²) + eps)`.
    pub fn forward_vec(&self, x: &[f32], out: &mut [f32]) {
        crate::ops::rms_norm(x, &self.values, self.eps, out);
    }

    /// The norm of every `width`-wide piece of `x`, in place (per-head q/k norms).
    pub fn forward_heads(&self, x: &mut [f32]) {
        crate::ops::rms_norm_heads(x, &self.values, self.eps);
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// `(x − mean) / √(var + eps) · w + b` over the last axis, with affine weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// Loads `{name}.weight` and `{name}.bias` of width `dim`.
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[dim])?,
            bias: w.get(&format!("{name}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}
