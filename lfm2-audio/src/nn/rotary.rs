//! Rotary position embedding tables: the `cos` and `sin` of `position · f_i` for each pair of a
//! head's values, in f32 as the references compute them. The tables serve both conventions
//! (rotate-half in the LFM2 stack, interleaved pairs in the depthformer and Mimi); only the
//! frequencies `f_i` differ between the models, and are set by the constructor.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Rotary tables for one head width and frequency set.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    /// LFM2's frequencies (the backbone, the LFM2 detokenizer and the depthformer):
    /// `f_i = 1 / theta^(2i/d)`, in f32.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let theta = theta as f32;
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// Mimi's frequencies: `f_i = exp(−2i·ln(max_period)/d)`, the exponent's step in f64 and
    /// the exponential in f32, as Mimi computes them.
    pub fn with_max_period(head_dim: usize, max_period: f64) -> Self {
        let step = (-(max_period.ln()) * 2.0 / head_dim as f64) as f32;
        let inv_freq = (0..head_dim / 2).map(|i| (i as f32 * step).exp()).collect();
        Self { inv_freq }
    }

    /// `cos` and `sin` (`head_dim/2` values each) of position `pos`, as [`Rotary::tables`]
    /// computes them.
    pub fn fill(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = pos as f32 * f;
            *c = angle.cos();
            *s = angle.sin();
        }
    }

    /// `(cos, sin)`, each `n · head_dim/2` values (position-major), for positions
    /// `start..start + n`.
    pub fn values(&self, start: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for i in 0..n {
            let row = i * half..(i + 1) * half;
            self.fill(start + i, &mut cos[row.clone()], &mut sin[row]);
        }
        (cos, sin)
    }

    /// `(cos, sin)`, each `[n, head_dim/2]`, for positions `start..start + n`.
    pub fn tables(&self, start: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = self.values(start, n);
        Ok((
            Tensor::from_vec(cos, (n, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (n, half), &Device::Cpu)?,
        ))
    }
}
