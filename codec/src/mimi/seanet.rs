//! The SEANet decoder of Mimi: 25 Hz latent → 24 kHz waveform (`decoder.model.*`).
//!
//! ```text
//! conv k7 (dimension → 2^n·filters)
//! per ratio r:  ELU → transposed conv (ch → ch/2, kernel 2r, stride r) → residual blocks
//! ELU → conv k3 (filters → 1)
//! residual block j: x + conv k1(ELU(conv k3, dilation base^j (ELU(x))))   (true skip)
//! ```
//! Modules are numbered as in the reference's `nn.Sequential`, ELUs included, which is how the
//! checkpoint names them.

use candle_core::Tensor;
use lfm2_audio::weights::Weights;

use super::config::SeanetConfig;
use super::conv::{CausalConv1d, CausalConvTranspose1d};
use crate::Result;

/// ELU slope for negative inputs (`activation_params` alpha of the reference, 1.0).
const ELU_ALPHA: f64 = 1.0;

#[derive(Debug, Clone)]
struct ResidualBlock {
    conv1: CausalConv1d,
    conv2: CausalConv1d,
    /// A k1 convolution when `true_skip` is off.
    shortcut: Option<CausalConv1d>,
}

#[derive(Debug, Clone)]
struct Stage {
    upsample: CausalConvTranspose1d,
    residuals: Vec<ResidualBlock>,
}

/// The decoder's weights.
#[derive(Debug, Clone)]
pub struct SeanetDecoder {
    first: CausalConv1d,
    stages: Vec<Stage>,
    last: CausalConv1d,
}

/// What every convolution of the decoder remembers between calls, in execution order.
#[derive(Debug, Clone)]
pub struct SeanetState {
    slots: Vec<Tensor>,
}

impl SeanetDecoder {
    /// Loads `{prefix}.model.*` for the configuration.
    pub fn load(w: &Weights, prefix: &str, cfg: &SeanetConfig) -> Result<Self> {
        let mut index = 0;
        let mut next = || {
            let name = format!("{prefix}.model.{index}");
            index += 1;
            name
        };
        let mut mult = 1usize << cfg.ratios.len();
        let first = CausalConv1d::load(
            w,
            &next(),
            cfg.dimension,
            mult * cfg.n_filters,
            cfg.kernel_size,
            1,
            true,
        )?;
        let mut stages = Vec::with_capacity(cfg.ratios.len());
        for &ratio in &cfg.ratios {
            next(); // ELU
            let ch = mult * cfg.n_filters;
            let upsample =
                CausalConvTranspose1d::load(w, &next(), ch, ch / 2, 2 * ratio, ratio, true)?;
            let dim = ch / 2;
            let hidden = dim / cfg.compress;
            let mut residuals = Vec::with_capacity(cfg.n_residual_layers);
            for j in 0..cfg.n_residual_layers {
                let block = next();
                let dilation = u32::try_from(j)
                    .ok()
                    .and_then(|j| cfg.dilation_base.checked_pow(j))
                    .ok_or_else(|| {
                        crate::Error::Invalid(format!("{block}: dilation base^{j} is too large"))
                    })?;
                // block.0 and block.2 are the ELUs.
                let conv1 = CausalConv1d::load(
                    w,
                    &format!("{block}.block.1"),
                    dim,
                    hidden,
                    cfg.residual_kernel_size,
                    dilation,
                    true,
                )?;
                let conv2 =
                    CausalConv1d::load(w, &format!("{block}.block.3"), hidden, dim, 1, 1, true)?;
                let shortcut = if cfg.true_skip {
                    None
                } else {
                    Some(CausalConv1d::load(
                        w,
                        &format!("{block}.shortcut"),
                        dim,
                        dim,
                        1,
                        1,
                        true,
                    )?)
                };
                residuals.push(ResidualBlock {
                    conv1,
                    conv2,
                    shortcut,
                });
            }
            stages.push(Stage {
                upsample,
                residuals,
            });
            mult /= 2;
        }
        next(); // ELU
        let last = CausalConv1d::load(
            w,
            &next(),
            cfg.n_filters,
            cfg.channels,
            cfg.last_kernel_size,
            1,
            true,
        )?;
        Ok(Self {
            first,
            stages,
            last,
        })
    }

    /// The state of a new stream.
    pub fn new_state(&self) -> Result<SeanetState> {
        let mut slots = vec![self.first.initial_state()?];
        for stage in &self.stages {
            slots.push(stage.upsample.initial_state()?);
            for r in &stage.residuals {
                slots.push(r.conv1.initial_state()?);
                slots.push(r.conv2.initial_state()?);
                if let Some(s) = &r.shortcut {
                    slots.push(s.initial_state()?);
                }
            }
        }
        slots.push(self.last.initial_state()?);
        Ok(SeanetState { slots })
    }

    /// `x`: `[1, dimension, T]` at 25 Hz → `[1, 1, T·960]` at 24 kHz.
    pub fn step(&self, x: &Tensor, state: &mut SeanetState) -> Result<Tensor> {
        let mut slots = state.slots.iter_mut();
        let mut slot = || {
            slots.next().ok_or_else(|| {
                crate::Error::Invalid("the SEANet state belongs to another model".into())
            })
        };
        let mut x = self.first.step(x, slot()?)?;
        for stage in &self.stages {
            x = stage.upsample.step(&x.elu(ELU_ALPHA)?, slot()?)?;
            for r in &stage.residuals {
                let y = r.conv1.step(&x.elu(ELU_ALPHA)?, slot()?)?;
                let y = r.conv2.step(&y.elu(ELU_ALPHA)?, slot()?)?;
                let skip = match &r.shortcut {
                    Some(s) => s.step(&x, slot()?)?,
                    None => x,
                };
                x = (skip + y)?;
            }
        }
        self.last.step(&x.elu(ELU_ALPHA)?, slot()?)
    }
}
