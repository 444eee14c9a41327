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
    /// GGML Q6_K (6.56 bits) for the decode weights, Q8_0 for the rest.
    Q6k,
    /// GGML Q4_K for the backbone's feed-forward maps; Q6_K for its attention and convolution
    /// maps, the text head and the depthformer; Q8_0 for the rest (about 5 bits a weight).
    Mixed,
    /// GGML Q4_K (4.5 bits) for the decode weights, Q8_0 for the rest.
    Q4k,
    /// 4-bit blocks (GGML Q4_0) for the decode weights, 8-bit for the encoder, detokenizer and
    /// embedding tables.
    Q4,
}

impl Quant {
    /// Every preset, widest first, by the name `--quant` and the configuration file use.
    pub const ALL: [(&'static str, Quant); 6] = [
        ("f32", Quant::F32),
        ("q8", Quant::Q8),
        ("q6k", Quant::Q6k),
        ("mixed", Quant::Mixed),
        ("q4k", Quant::Q4k),
        ("q4", Quant::Q4),
    ];

    /// The preset called `name`.
    pub fn from_name(name: &str) -> Option<Quant> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|&(_, q)| q)
    }

    /// The storage plan of this preset on `threads`.
    pub fn plan(self, threads: Arc<Threads>) -> QuantPlan {
        use lfm2_audio::weights::DecodeRole::{Depth, Head, Operator};
        match self {
            Quant::F32 => QuantPlan {
                threads: Some(threads),
                ..QuantPlan::f32()
            },
            Quant::Q8 => QuantPlan::with_format(Format::Q8_0, threads),
            Quant::Q6k => QuantPlan::with_format(Format::Q6_K, threads),
            Quant::Mixed => QuantPlan::mixed(
                Format::Q4_K,
                &[
                    (Operator, Format::Q6_K),
                    (Head, Format::Q6_K),
                    (Depth, Format::Q6_K),
                ],
                Format::Q8_0,
                threads,
            ),
            Quant::Q4k => QuantPlan::with_format(Format::Q4_K, threads),
            Quant::Q4 => QuantPlan::with_format(Format::Q4_0, threads),
        }
    }
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
        Ok(self.quant.plan(threads))
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
