//! How a command loads the model: weight format and threads.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::quant::{Format, Threads};
use lfm2_audio::weights::QuantPlan;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// f32 weights: the exact path, checked against the reference.
    F32,
    /// 8-bit blocks (GGML Q8_0) for every large matrix.
    Q8,
    /// 4-bit blocks (GGML Q4_0) for the decode weights, 8-bit for the encoder, detokenizer and
    /// embedding tables.
    Q4,
}

/// Flags for loading a model.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Weight format. Quantized weights are computed at the first load and cached in
    /// `<model>/.lfm2d-cache/`, so later starts are fast.
    #[arg(long, value_enum, default_value = "f32")]
    pub quant: Quant,
    /// Threads for the model (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl RuntimeArgs {
    pub fn plan(&self) -> anyhow::Result<QuantPlan> {
        let threads = match self.threads {
            Some(0) => anyhow::bail!("--threads must be at least 1"),
            Some(n) => Threads::new(n)?,
            None => Threads::all_cores()?,
        };
        let threads = Arc::new(threads);
        Ok(match self.quant {
            Quant::F32 => QuantPlan {
                threads: Some(threads),
                ..QuantPlan::f32()
            },
            Quant::Q8 => QuantPlan::with_format(Format::Q8_0, threads),
            Quant::Q4 => QuantPlan::with_format(Format::Q4_0, threads),
        })
    }

    /// Loads `dir` as these flags say.
    pub fn load(&self, dir: &Path) -> anyhow::Result<Lfm2AudioModel> {
        if let Some(n) = self.threads {
            // candle's own parallel kernels (f32 products, prefill) follow rayon's pool.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        Lfm2AudioModel::load_with(dir, self.plan()?)
            .with_context(|| format!("loading the model in {}", dir.display()))
    }
}
