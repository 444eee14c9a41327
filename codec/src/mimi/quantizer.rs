//! Mimi's split residual vector quantizer, decode direction (`quantizer.*`).
//!
//! Codebook 0 goes through `rvq_first`, codebooks 1…7 through `rvq_rest` (their vectors summed in
//! order); each part has its own `output_proj` (a k1 convolution without bias), and the two
//! projections are added. Codebook vectors are `embedding_sum / max(cluster_usage, 1e-5)`.

use candle_core::{Device, Tensor};
use lfm2_audio::weights::Weights;

use super::config::QuantizerConfig;
use lfm2_audio::format::{Frame, CODEBOOKS};

use crate::Result;

/// `epsilon` of the reference's `EuclideanCodebook`.
const USAGE_EPSILON: f64 = 1e-5;

#[derive(Debug, Clone)]
struct ResidualQuantizer {
    /// One `[bins, dim]` table per active codebook.
    codebooks: Vec<Tensor>,
    /// `output_proj` as `[out, dim]`.
    output_proj: Tensor,
}

impl ResidualQuantizer {
    fn load(
        w: &Weights,
        prefix: &str,
        n: usize,
        cfg: &QuantizerConfig,
        out: usize,
    ) -> Result<Self> {
        let (bins, dim) = (cfg.bins, cfg.dimension);
        let codebooks = (0..n)
            .map(|i| {
                let p = format!("{prefix}.vq.layers.{i}._codebook");
                let sum = w.get(&format!("{p}.embedding_sum"), &[bins, dim])?;
                let usage = w.get(&format!("{p}.cluster_usage"), &[bins])?;
                let usage = usage.clamp(USAGE_EPSILON, f64::INFINITY)?;
                Ok(sum.broadcast_div(&usage.unsqueeze(1)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let output_proj = w
            .get(&format!("{prefix}.output_proj.weight"), &[out, dim, 1])?
            .squeeze(2)?;
        Ok(Self {
            codebooks,
            output_proj,
        })
    }

    /// Sum of the codebook vectors of `codes[c]` (codebook `c` of this quantizer), projected:
    /// `[T, out]`.
    fn decode(&self, codes: &[Vec<u32>]) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (table, ids) in self.codebooks.iter().zip(codes) {
            let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
            let v = table.index_select(&ids, 0)?;
            sum = Some(match sum {
                Some(s) => (s + v)?,
                None => v,
            });
        }
        let sum = sum.ok_or_else(|| crate::Error::Invalid("no codebooks".into()))?;
        Ok(sum.matmul(&self.output_proj.t()?)?)
    }
}

/// The quantizer's decode path.
#[derive(Debug, Clone)]
pub struct Quantizer {
    first: ResidualQuantizer,
    rest: ResidualQuantizer,
}

impl Quantizer {
    /// Loads the 8 active codebooks of `{prefix}.rvq_first` and `{prefix}.rvq_rest`; `out` is
    /// the latent width.
    pub fn load(w: &Weights, prefix: &str, cfg: &QuantizerConfig, out: usize) -> Result<Self> {
        Ok(Self {
            first: ResidualQuantizer::load(w, &format!("{prefix}.rvq_first"), 1, cfg, out)?,
            rest: ResidualQuantizer::load(
                w,
                &format!("{prefix}.rvq_rest"),
                CODEBOOKS - 1,
                cfg,
                out,
            )?,
        })
    }

    /// The latent of each frame: `[T, out]`. Codes must already be checked.
    pub fn decode(&self, frames: &[Frame]) -> Result<Tensor> {
        let per_codebook: Vec<Vec<u32>> = (0..CODEBOOKS)
            .map(|c| frames.iter().map(|f| f[c]).collect())
            .collect();
        let first = self.first.decode(&per_codebook[..1])?;
        let rest = self.rest.decode(&per_codebook[1..])?;
        Ok((first + rest)?)
    }
}
