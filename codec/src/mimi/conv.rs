//! Causal 1-D convolutions and transposed convolutions that stream.
//!
//! They follow the reference's `StreamingConv1d` / `StreamingConvTranspose1d` (causal, constant
//! padding): a convolution is left-padded with `(K − 1)·d` zeros, which streaming keeps as the
//! last `(K − 1)·d` inputs; a transposed convolution drops its last `K − S` outputs, which
//! streaming keeps (without bias) and adds to the start of the next call's output. Batch decoding
//! is one call on a fresh state, so batch and streaming compute the same sums.
//!
//! Tensors are `[1, channels, time]`.
//!
//! A call with only a few time steps (the first SEANet stages see 2 per streamed frame) runs as
//! one matrix-vector product per step instead of candle's im2col / col2im convolution: the CPU
//! matmul repacks the whole weight for any product with more than one row, which costs more than
//! the arithmetic at this size. Both paths compute the same sums.

/// Up to this many time steps per call, convolutions run step by step (see above).
const STEP_BY_STEP_MAX: usize = 4;

use candle_core::{Device, Tensor};
use lfm2_audio::weights::Weights;

use crate::{Error, Result};

/// A causal convolution with stride 1 and optional dilation (`{prefix}.conv.conv.*`).
#[derive(Debug, Clone)]
pub struct CausalConv1d {
    /// `[out, in, K]`.
    weight: Tensor,
    /// The same weight as `[out, in·K]` (index `i·K + k`), for the step-by-step path.
    weight_rows: Tensor,
    kernel: usize,
    /// `[1, out, 1]`.
    bias: Option<Tensor>,
    dilation: usize,
    in_channels: usize,
    /// Inputs remembered between calls: `(K − 1)·dilation`.
    context: usize,
}

impl CausalConv1d {
    /// Loads `{prefix}.conv.conv.weight` `[out, in, kernel]` and, with `bias`, `.bias` `[out]`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        dilation: usize,
        bias: bool,
    ) -> Result<Self> {
        let context = kernel
            .checked_sub(1)
            .and_then(|k| k.checked_mul(dilation))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{prefix}: convolution with kernel {kernel} and dilation {dilation}"
                ))
            })?;
        let name = format!("{prefix}.conv.conv");
        let weight = w.get(
            &format!("{name}.weight"),
            &[out_channels, in_channels, kernel],
        )?;
        let bias = if bias {
            Some(
                w.get(&format!("{name}.bias"), &[out_channels])?
                    .reshape((1, out_channels, 1))?,
            )
        } else {
            None
        };
        Ok(Self {
            weight_rows: weight.reshape((out_channels, in_channels * kernel))?,
            weight,
            kernel,
            bias,
            dilation,
            in_channels,
            context,
        })
    }

    /// The state of a new stream: `context` zero inputs, `[1, in, context]`.
    pub fn initial_state(&self) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (1, self.in_channels, self.context),
            candle_core::DType::F32,
            &Device::Cpu,
        )?)
    }

    /// `x`: `[1, in, T]` → `[1, out, T]`; `previous` holds the last inputs and is updated.
    pub fn step(&self, x: &Tensor, previous: &mut Tensor) -> Result<Tensor> {
        let t = x.dim(2)?;
        let xx = if self.context == 0 {
            x.clone()
        } else {
            Tensor::cat(&[&*previous, x], 2)?
        };
        let y = if t <= STEP_BY_STEP_MAX {
            self.step_by_step(&xx, t)?
        } else {
            xx.conv1d(&self.weight, 0, 1, self.dilation, 1)?
        };
        if self.context > 0 {
            let len = xx.dim(2)?;
            *previous = xx
                .narrow(2, len - self.context, self.context)?
                .contiguous()?;
        }
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The convolution of the padded input `xx` (`[1, in, context + t]`) as `t` products of
    /// the flattened weight with one im2col column each: `y[:, r] = W · col_r`,
    /// `col_r[i·K + k] = xx[i, r + k·d]`.
    fn step_by_step(&self, xx: &Tensor, t: usize) -> Result<Tensor> {
        let len = xx.dim(2)?;
        let data = xx.flatten_all()?.to_vec1::<f32>()?;
        let (cin, k, d) = (self.in_channels, self.kernel, self.dilation);
        let mut cols = vec![0f32; t * cin * k];
        for (r, col) in cols.chunks_mut(cin * k).enumerate() {
            for (i, taps) in col.chunks_mut(k).enumerate() {
                for (j, tap) in taps.iter_mut().enumerate() {
                    *tap = data[i * len + r + j * d];
                }
            }
        }
        let cols = Tensor::from_vec(cols, (t, cin * k), &Device::Cpu)?;
        let rows = (0..t)
            .map(|r| Ok(cols.narrow(0, r, 1)?.matmul(&self.weight_rows.t()?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?.t()?.unsqueeze(0)?.contiguous()?)
    }
}

/// A causal transposed convolution with kernel `K` and stride `S`, groups 1
/// (`{prefix}.convtr.convtr.*`).
#[derive(Debug, Clone)]
pub struct CausalConvTranspose1d {
    /// `[in, out, K]`.
    weight: Tensor,
    /// The same weight as `[in, out·K]`, for the step-by-step path.
    weight_rows: Tensor,
    kernel: usize,
    bias: Option<Tensor>,
    stride: usize,
    out_channels: usize,
    /// Outputs carried to the next call: `K − S`.
    overlap: usize,
}

impl CausalConvTranspose1d {
    /// Loads `{prefix}.convtr.convtr.weight` `[in, out, kernel]` and, with `bias`, `.bias`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
        if stride == 0 || kernel < stride {
            return Err(Error::Invalid(format!(
                "{prefix}: transposed convolution with kernel {kernel} and stride {stride}"
            )));
        }
        let name = format!("{prefix}.convtr.convtr");
        let weight = w.get(
            &format!("{name}.weight"),
            &[in_channels, out_channels, kernel],
        )?;
        let bias = if bias {
            Some(
                w.get(&format!("{name}.bias"), &[out_channels])?
                    .reshape((1, out_channels, 1))?,
            )
        } else {
            None
        };
        Ok(Self {
            weight_rows: weight.reshape((in_channels, out_channels * kernel))?,
            weight,
            kernel,
            bias,
            stride,
            out_channels,
            overlap: kernel - stride,
        })
    }

    /// The state of a new stream: no pending overlap, `[1, out, K − S]` zeros.
    pub fn initial_state(&self) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (1, self.out_channels, self.overlap),
            candle_core::DType::F32,
            &Device::Cpu,
        )?)
    }

    /// `x`: `[1, in, T]` → `[1, out, T·S]`; `partial` holds the overlap and is updated.
    pub fn step(&self, x: &Tensor, partial: &mut Tensor) -> Result<Tensor> {
        let t = x.dim(2)?;
        // Full output: (T − 1)·S + K = T·S + overlap samples, without bias.
        let y = if t <= STEP_BY_STEP_MAX {
            self.step_by_step(x, t)?
        } else {
            x.conv_transpose1d(&self.weight, 0, 0, self.stride, 1, 1)?
        };
        let full = y.dim(2)?;
        let y = if self.overlap > 0 {
            let head = (y.narrow(2, 0, self.overlap)? + &*partial)?;
            let rest = y.narrow(2, self.overlap, full - self.overlap)?;
            Tensor::cat(&[&head, &rest], 2)?
        } else {
            y
        };
        let out = y.narrow(2, 0, t * self.stride)?;
        *partial = y.narrow(2, t * self.stride, self.overlap)?.contiguous()?;
        Ok(match &self.bias {
            Some(b) => out.broadcast_add(b)?,
            None => out.contiguous()?,
        })
    }
}

impl CausalConvTranspose1d {
    /// The full transposed convolution of `x` (`[1, in, t]`) as one product per input step,
    /// overlap-added: `y[o, r·S + k] += (x[:, r]ᵀ · W)[o·K + k]`.
    fn step_by_step(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let (cout, k, s) = (self.out_channels, self.kernel, self.stride);
        let full = t * s + self.overlap;
        let cols = x.squeeze(0)?.t()?.contiguous()?; // [t, in]
        let mut y = vec![0f32; cout * full];
        for r in 0..t {
            let c = cols
                .narrow(0, r, 1)?
                .matmul(&self.weight_rows)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (row, taps) in y.chunks_mut(full).zip(c.chunks(k)) {
                for (o, w) in row[r * s..r * s + k].iter_mut().zip(taps) {
                    *o += w;
                }
            }
        }
        Ok(Tensor::from_vec(y, (1, cout, full), &Device::Cpu)?)
    }
}

/// A causal depthwise transposed convolution without bias: the ×2 upsampling of Mimi's latent
/// (`ConvTrUpsample1d` with the channel-wise setting of the released checkpoint), weight
/// `{prefix}.convtr.convtr.weight` `[channels, 1, K]`.
#[derive(Debug, Clone)]
pub struct DepthwiseConvTranspose1d {
    /// `[channels · K]`, row per channel.
    weight: Vec<f32>,
    channels: usize,
    kernel: usize,
    stride: usize,
}

impl DepthwiseConvTranspose1d {
    /// Loads the weight `[channels, 1, kernel]`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        if stride == 0 || kernel < stride {
            return Err(Error::Invalid(format!(
                "{prefix}: transposed convolution with kernel {kernel} and stride {stride}"
            )));
        }
        let weight = w
            .get(
                &format!("{prefix}.convtr.convtr.weight"),
                &[channels, 1, kernel],
            )?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            weight,
            channels,
            kernel,
            stride,
        })
    }

    /// The state of a new stream: `[channels · (K − S)]` zeros.
    pub fn initial_state(&self) -> Vec<f32> {
        vec![0.0; self.channels * (self.kernel - self.stride)]
    }

    /// `x`: `[1, channels, T]` → `[1, channels, T·S]`; `partial` holds the overlap.
    pub fn step(&self, x: &Tensor, partial: &mut [f32]) -> Result<Tensor> {
        let (_, c, t) = x.dims3()?;
        if c != self.channels {
            return Err(Error::Invalid(format!(
                "upsampling expects {} channels, got {c}",
                self.channels
            )));
        }
        let (k, s) = (self.kernel, self.stride);
        let overlap = k - s;
        let x = x.flatten_all()?.to_vec1::<f32>()?;
        let full = t * s + overlap;
        let mut y = vec![0f32; c * full];
        for ch in 0..c {
            let w = &self.weight[ch * k..(ch + 1) * k];
            let row = &mut y[ch * full..(ch + 1) * full];
            for (i, &xv) in x[ch * t..(ch + 1) * t].iter().enumerate() {
                for (o, &wv) in row[i * s..i * s + k].iter_mut().zip(w) {
                    *o += xv * wv;
                }
            }
            for (o, p) in row[..overlap]
                .iter_mut()
                .zip(&partial[ch * overlap..(ch + 1) * overlap])
            {
                *o += p;
            }
            partial[ch * overlap..(ch + 1) * overlap].copy_from_slice(&row[t * s..]);
        }
        let out: Vec<f32> = y
            .chunks(full)
            .flat_map(|row| row[..t * s].iter().copied())
            .collect();
        Ok(Tensor::from_vec(out, (1, c, t * s), &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights_file(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> (tempfile::TempDir, Weights) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, s, v)| {
                (
                    n.to_string(),
                    Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        let w = Weights::open(&path).unwrap();
        (dir, w)
    }

    fn ramp(n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * a).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn causal_conv_is_a_zero_padded_convolution_and_streams() {
        let (_d, w) = weights_file(&[
            ("c.conv.conv.weight", vec![3, 2, 3], ramp(18, 0.1)),
            ("c.conv.conv.bias", vec![3], vec![0.5, -0.25, 1.0]),
        ]);
        let conv = CausalConv1d::load(&w, "c", 2, 3, 3, 2, true).unwrap();
        let x = Tensor::from_vec(ramp(2 * 10, 0.2), (1, 2, 10), &Device::Cpu).unwrap();
        let mut state = conv.initial_state().unwrap();
        let batch = conv.step(&x, &mut state).unwrap();
        // Direct: y[o, t] = b[o] + Σ_{i,k} w[o,i,k] · x[i, t − (K−1−k)·d], zero before 0.
        let wv = ramp(18, 0.1);
        let xv = ramp(20, 0.2);
        let b = [0.5, -0.25, 1.0];
        let bv = batch.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for o in 0..3 {
            for t in 0..10 {
                let mut acc = b[o];
                for i in 0..2 {
                    for k in 0..3 {
                        let back = (2 - k) * 2;
                        if t >= back {
                            acc += wv[o * 6 + i * 3 + k] * xv[i * 10 + t - back];
                        }
                    }
                }
                assert!((bv[o * 10 + t] - acc).abs() < 1e-5);
            }
        }
        let mut state = conv.initial_state().unwrap();
        let parts: Vec<Tensor> = [3, 1, 6]
            .iter()
            .scan(0, |start, &n| {
                let part = x.narrow(2, *start, n).unwrap();
                *start += n;
                Some(conv.step(&part, &mut state).unwrap())
            })
            .collect();
        let streamed = Tensor::cat(&parts, 2).unwrap();
        assert!(max_diff(&streamed, &batch) < 1e-6);
    }

    #[test]
    fn transposed_convs_stream_like_batch() {
        let (_d, w) = weights_file(&[
            ("t.convtr.convtr.weight", vec![2, 3, 4], ramp(24, 0.1)),
            ("t.convtr.convtr.bias", vec![3], vec![0.1, 0.2, 0.3]),
            ("u.convtr.convtr.weight", vec![2, 1, 4], ramp(8, 0.3)),
        ]);
        let x = Tensor::from_vec(ramp(2 * 7, 0.2), (1, 2, 7), &Device::Cpu).unwrap();

        let dense = CausalConvTranspose1d::load(&w, "t", 2, 3, 4, 2, true).unwrap();
        let depth = DepthwiseConvTranspose1d::load(&w, "u", 2, 4, 2).unwrap();
        let mut s = dense.initial_state().unwrap();
        let batch = dense.step(&x, &mut s).unwrap();
        assert_eq!(batch.dims(), &[1, 3, 14]);
        let mut p = depth.initial_state();
        let batch_dw = depth.step(&x, &mut p).unwrap();
        assert_eq!(batch_dw.dims(), &[1, 2, 14]);

        // Depthwise against the definition y[c, t·S + k] += x[c, t] · w[c, k], first T·S kept.
        let xv = ramp(14, 0.2);
        let wv = ramp(8, 0.3);
        let got = batch_dw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for c in 0..2 {
            let mut full = [0f32; 16];
            for t in 0..7 {
                for k in 0..4 {
                    full[t * 2 + k] += xv[c * 7 + t] * wv[c * 4 + k];
                }
            }
            for j in 0..14 {
                assert!((got[c * 14 + j] - full[j]).abs() < 1e-5);
            }
        }

        let mut s = dense.initial_state().unwrap();
        let mut p = depth.initial_state();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for start in 0..7 {
            let part = x.narrow(2, start, 1).unwrap();
            a.push(dense.step(&part, &mut s).unwrap());
            b.push(depth.step(&part, &mut p).unwrap());
        }
        assert!(max_diff(&Tensor::cat(&a, 2).unwrap(), &batch) < 1e-6);
        assert!(max_diff(&Tensor::cat(&b, 2).unwrap(), &batch_dw) < 1e-6);
    }
}
