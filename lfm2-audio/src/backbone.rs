//! The LFM2-Audio backbone: token embeddings, the LFM2 stack, and the tied text head.

use candle_core::Tensor;

use crate::config::Lfm2Config;
use crate::error::{Error, Result};
use crate::lfm2::{Lfm2, Lfm2State};
use crate::nn::{Linear, Table};
use crate::weights::{WeightClass, Weights};

/// Tensor-name prefix of the backbone in an LFM2-Audio checkpoint.
pub const PREFIX: &str = "lfm";

/// The backbone with its embedding table.
#[derive(Debug, Clone)]
pub struct Backbone {
    lfm: Lfm2,
    /// `[vocab, hidden]`: text input embeddings.
    embed_tokens: Table,
    /// The tied text head: the same matrix, as a linear map.
    head: Linear,
}

impl Backbone {
    pub fn load(w: &Weights, cfg: &Lfm2Config) -> Result<Self> {
        // The table is read whole for every text logit, so it is stored as a decode weight.
        let name = format!("{PREFIX}.embed_tokens.weight");
        let embed_tokens = Table::load(
            w,
            &name,
            cfg.vocab_size,
            cfg.hidden_size,
            WeightClass::Decode,
        )?;
        let head = embed_tokens.as_linear(w.plan().threads.as_ref());
        let lfm = Lfm2::load(w, PREFIX, cfg)?;
        Ok(Self {
            lfm,
            embed_tokens,
            head,
        })
    }

    /// Bytes of the weights (quantized or f32).
    pub fn weight_bytes(&self) -> usize {
        self.embed_tokens.bytes() + self.lfm.weight_bytes()
    }

    pub fn config(&self) -> &Lfm2Config {
        self.lfm.config()
    }

    pub fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }

    pub fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    pub fn stack(&self) -> &Lfm2 {
        &self.lfm
    }

    pub fn new_state(&self) -> Result<Lfm2State> {
        self.lfm.new_state()
    }

    /// Input embeddings `[T, hidden]` of text tokens (raw rows, no scaling).
    pub fn embed_text(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        self.embed_tokens.lookup(ids)
    }

    /// Text logits `[T, vocab]` of final-normed hidden states `[T, hidden]`.
    pub fn text_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head.forward(hidden)
    }
}
