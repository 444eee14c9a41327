//! A model directory in the official Hugging Face layout, and the loaded model.
//!
//! ```text
//! config.json                                    required
//! model.safetensors                              required (f32, bf16 or f16)
//! tokenizer.json                                 required
//! audio_detokenizer/{config.json,model.safetensors}   LFM2.5-Audio only
//! tokenizer-e351c8d8-checkpoint125.safetensors   Mimi codec
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backbone::Backbone;
use crate::config::Lfm2AudioConfig;
use crate::depthformer::AudioHead;
use crate::encoder::AudioEncoder;
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
use crate::weights::{QuantPlan, Weights};

/// File name of the Mimi codec weights inside a model directory.
pub const MIMI_FILE: &str = "tokenizer-e351c8d8-checkpoint125.safetensors";

/// The files of a model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
}

impl ModelDir {
    /// Checks that `root` is a directory holding the required files.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::MissingFile {
                path: root.to_owned(),
                what: "model directory",
            });
        }
        let dir = Self {
            root: root.to_owned(),
        };
        for (path, what) in [
            (dir.config(), "model configuration"),
            (dir.weights(), "model weights"),
            (dir.tokenizer(), "text tokenizer"),
        ] {
            if !path.is_file() {
                return Err(Error::MissingFile { path, what });
            }
        }
        Ok(dir)
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }

    pub fn weights(&self) -> PathBuf {
        self.root.join("model.safetensors")
    }

    pub fn tokenizer(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }

    /// The LFM2.5 audio detokenizer, if the directory has one.
    pub fn audio_detokenizer(&self) -> Option<PathBuf> {
        let dir = self.root.join("audio_detokenizer");
        dir.join("model.safetensors").is_file().then_some(dir)
    }

    /// The Mimi codec weights, if the directory has them.
    pub fn mimi(&self) -> Option<PathBuf> {
        let path = self.root.join(MIMI_FILE);
        path.is_file().then_some(path)
    }
}

/// A loaded LFM2-Audio model: configuration, tokenizer and backbone.
#[derive(Debug, Clone)]
pub struct Lfm2AudioModel {
    pub dir: ModelDir,
    pub config: Lfm2AudioConfig,
    pub tokenizer: TextTokenizer,
    pub backbone: Arc<Backbone>,
    pub audio: Arc<AudioEncoder>,
    pub audio_head: Arc<AudioHead>,
    /// How the weights are stored (for loading companions such as the detokenizer alike).
    pub plan: QuantPlan,
}

impl Lfm2AudioModel {
    /// Loads a model directory in f32 (the exact path), checking every file and tensor it reads.
    pub fn load(root: &Path) -> Result<Self> {
        Self::load_with(root, QuantPlan::f32())
    }

    /// Loads a model directory, storing large matrices as `plan` says.
    pub fn load_with(root: &Path, plan: QuantPlan) -> Result<Self> {
        let dir = ModelDir::open(root)?;
        let config = Lfm2AudioConfig::from_file(&dir.config())?;
        let tokenizer = TextTokenizer::from_file(&dir.tokenizer())?;
        let weights = Weights::open(&dir.weights())?.with_plan(plan.clone());
        let backbone = Arc::new(Backbone::load(&weights, &config.lfm)?);
        let audio = Arc::new(AudioEncoder::load(&weights, &config)?);
        let audio_head = Arc::new(AudioHead::load(
            &weights,
            &config.lfm,
            &config.depthformer,
            config.codebooks,
        )?);
        // Quantizing takes seconds; the next start reads the result back. A model directory
        // that cannot be written to only costs that time again.
        let _ = weights.save_cache();
        if tokenizer.vocab_size() > config.lfm.vocab_size {
            // Ids beyond the embedding table would be an error at the first such token; say it now.
            return Err(Error::Tokenizer {
                path: dir.tokenizer(),
                message: format!(
                    "knows {} ids but the model's vocabulary (lfm.vocab_size) is {}",
                    tokenizer.vocab_size(),
                    config.lfm.vocab_size
                ),
            });
        }
        Ok(Self {
            dir,
            config,
            tokenizer,
            backbone,
            audio,
            audio_head,
            plan,
        })
    }
}
