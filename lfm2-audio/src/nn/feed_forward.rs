//! The SwiGLU feed-forward of the LFM2 stack and the depthformer.

use candle_core::Tensor;

use super::linear::{forward_vec_many, Linear};
use crate::error::Result;
use crate::quant::Reread;
use crate::weights::Weights;

/// SwiGLU feed-forward: `w2(silu(w1 x) ⊙ w3 x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    pub fn load(w: &Weights, prefix: &str, dim: usize, ff_dim: usize) -> Result<Self> {
        Ok(Self {
            w1: Linear::load(w, &format!("{prefix}.w1"), ff_dim, dim, false)?,
            w2: Linear::load(w, &format!("{prefix}.w2"), dim, ff_dim, false)?,
            w3: Linear::load(w, &format!("{prefix}.w3"), ff_dim, dim, false)?,
        })
    }

    /// Tells the three maps' products how often they are read again soon (see
    /// [`Linear::set_reread`]).
    pub fn set_reread(&mut self, reread: Reread) {
        for m in [&mut self.w1, &mut self.w2, &mut self.w3] {
            m.set_reread(reread);
        }
    }

    pub fn weight_bytes(&self) -> usize {
        self.w1.weight_bytes() + self.w2.weight_bytes() + self.w3.weight_bytes()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.w1.forward(x)?)?;
        self.w2.forward(&(gate * self.w3.forward(x)?)?)
    }

    /// Width of the hidden layer.
    pub fn ff_dim(&self) -> usize {
        self.w1.dims().0
    }

    /// The feed-forward of one vector into `out`; `gate` and `up` hold [`FeedForward::ff_dim`]
    /// values of scratch.
    pub fn forward_vec(
        &self,
        x: &[f32],
        gate: &mut [f32],
        up: &mut [f32],
        out: &mut [f32],
    ) -> Result<()> {
        forward_vec_many(&[&self.w1, &self.w3], x, &mut [gate, up])?;
        crate::ops::silu_mul(gate, up);
        self.w2.forward_vec(gate, out)
    }
}
