//! A conversation's state in the backbone: what each position holds and the caches of every
//! layer, extended by `prefill` and `step`, and cut back by `truncate_to`.
//!
//! History is never recomputed: a new turn only runs its own positions. Truncation (barge-in:
//! keep only what the user actually heard) is a length change of position-indexed caches, so the
//! state after `truncate_to(p)` is the state a fresh prefill of the first `p` positions would
//! give, up to the floating-point effects of computing those positions in different batch
//! shapes (≈1e-6 relative).

use std::sync::Arc;

use candle_core::Tensor;

use crate::backbone::Backbone;
use crate::error::{Error, Result, Stop};
use crate::lfm2::Lfm2State;
use crate::prompt::Item;

/// Attention scores one prefill piece may hold (16 Mi values, 64 MiB).
const PREFILL_SCORES: usize = 1 << 24;

/// Positions a prefill piece takes after `len` positions: up to 512, halved until its scores
/// fit in [`PREFILL_SCORES`], at least 32. From [`crate::ops::POOLED_ATTENTION_MIN`] positions
/// on, attention takes one query at a time (no scores tensor), so pieces stay at 512.
fn prefill_piece(heads: usize, len: usize) -> usize {
    let mut n = 512;
    if len >= crate::ops::POOLED_ATTENTION_MIN {
        return n;
    }
    while n > 32 && heads * n * (len + n) > PREFILL_SCORES {
        n /= 2;
    }
    n
}

/// One conversation.
#[derive(Debug, Clone)]
pub struct Session {
    model: Arc<Backbone>,
    state: Lfm2State,
    items: Vec<Item>,
}

impl Session {
    pub fn new(model: Arc<Backbone>) -> Result<Self> {
        let state = model.new_state()?;
        Ok(Self {
            model,
            state,
            items: Vec::new(),
        })
    }

    pub fn model(&self) -> &Arc<Backbone> {
        &self.model
    }

    /// Number of positions in the conversation.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// What each position holds.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The backbone's caches.
    pub fn state(&self) -> &Lfm2State {
        &self.state
    }

    /// Positions left before the model's context limit.
    pub fn remaining(&self) -> usize {
        self.model
            .config()
            .max_position_embeddings
            .saturating_sub(self.len())
    }

    /// Runs `embeddings` (`[T, hidden]`, one row per item) at the next positions and returns the
    /// final-normed hidden states `[T, hidden]`.
    pub fn prefill(&mut self, embeddings: &Tensor, items: &[Item]) -> Result<Tensor> {
        self.prefill_until(embeddings, items, &crate::error::never)
    }

    /// As [`Session::prefill`], stopping between two layers when `stop` says so
    /// ([`Error::Stopped`]); the session is then as it was before.
    pub fn prefill_until(
        &mut self,
        embeddings: &Tensor,
        items: &[Item],
        stop: Stop,
    ) -> Result<Tensor> {
        let (t, _) = embeddings.dims2()?;
        if t != items.len() {
            return Err(Error::Invalid(format!(
                "{t} embeddings for {} positions",
                items.len()
            )));
        }
        if t > self.remaining() {
            return Err(Error::Invalid(format!(
                "the conversation would reach {} positions, over the model's context of {}",
                self.len() + t,
                self.model.config().max_position_embeddings
            )));
        }
        // A long prompt goes through in pieces, so that the attention scores of a piece (heads ×
        // piece × positions so far) stay within [`PREFILL_SCORES`]: re-prefilling a long
        // conversation in one batch would need gigabytes for them.
        let start = self.items.len();
        let mut done = 0;
        let mut hidden = Vec::new();
        while done < t {
            let n = prefill_piece(self.heads(), self.len()).min(t - done);
            let piece = if n == t {
                embeddings.clone()
            } else {
                embeddings.narrow(0, done, n)?
            };
            let out = self
                .model
                .stack()
                .forward_until(&piece, &mut self.state, stop);
            match out {
                Ok(h) => hidden.push(h),
                Err(e) => {
                    // Earlier pieces are undone too.
                    self.state.truncate(start);
                    self.items.truncate(start);
                    return Err(e);
                }
            }
            self.items.extend_from_slice(&items[done..done + n]);
            done += n;
        }
        Ok(match hidden.len() {
            1 => hidden.remove(0),
            _ => Tensor::cat(&hidden, 0)?,
        })
    }

    fn heads(&self) -> usize {
        self.model.config().num_attention_heads
    }

    /// Prefills text tokens.
    pub fn prefill_text(&mut self, ids: &[u32]) -> Result<Tensor> {
        let emb = self.model.embed_text(ids)?;
        let items: Vec<Item> = ids.iter().map(|&id| Item::Text(id)).collect();
        self.prefill(&emb, &items)
    }

    /// Runs one position (`embedding` of shape `[hidden]` or `[1, hidden]`) and returns its hidden
    /// state `[hidden]`.
    pub fn step(&mut self, embedding: &Tensor, item: Item) -> Result<Tensor> {
        let emb = match embedding.rank() {
            1 => embedding.unsqueeze(0)?,
            _ => embedding.clone(),
        };
        Ok(self.prefill(&emb, &[item])?.squeeze(0)?)
    }

    /// Runs one text token.
    pub fn step_text(&mut self, id: u32) -> Result<Tensor> {
        Ok(self.prefill_text(&[id])?.squeeze(0)?)
    }

    /// Keeps the first `position` positions and forgets the rest.
    pub fn truncate_to(&mut self, position: usize) -> Result<()> {
        if position > self.len() {
            return Err(Error::Invalid(format!(
                "cannot truncate to position {position}: the conversation has {} positions",
                self.len()
            )));
        }
        self.state.truncate(position);
        self.items.truncate(position);
        Ok(())
    }
}
