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

/// The thread count to use for `wanted`: at least 1, and at most the cores this process may use
/// (more threads than cores only wait on each other; a huge count would exhaust the system).
/// Above the core count it is clamped, with a warning.
pub fn checked_threads(wanted: Option<usize>) -> anyhow::Result<usize> {
    let cores = Threads::available();
    match wanted {
        None => Ok(cores),
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) if n > cores => {
            eprintln!(
                "warning: {n} threads requested, this machine has {cores} cores; using {cores}"
            );
            Ok(cores)
        }
        Some(n) => Ok(n),
    }
}

impl RuntimeArgs {
    pub fn plan(&self) -> anyhow::Result<QuantPlan> {
        let threads = Threads::new(checked_threads(self.threads)?)?;
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
        let plan = self.plan()?;
        if self.threads.is_some() {
            // candle's own parallel kernels (f32 products, prefill) follow rayon's pool.
            let n = plan.threads.as_ref().map_or(1, |t| t.len());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        Lfm2AudioModel::load_with(dir, plan)
            .with_context(|| format!("loading the model in {}", dir.display()))
    }
}
