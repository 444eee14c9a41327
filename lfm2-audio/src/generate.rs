//! Generation loops over a [`Session`].

use candle_core::Tensor;

use crate::error::Result;
use crate::sampling::Sampler;
use crate::session::Session;

/// Why a generation loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model emitted the stop token (not fed back, not returned).
    StopToken,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The conversation reached the model's context limit.
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// Text-only generation: from `hidden` (the final-normed state of the last prompt position),
/// sample a token, hand it to `on_token`, feed it back, and repeat until `stop_token`,
/// `max_new_tokens`, the context limit, or `on_token` returning `false`.
pub fn generate_text(
    session: &mut Session,
    hidden: &Tensor,
    sampler: &mut Sampler,
    max_new_tokens: usize,
    stop_token: Option<u32>,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<(Vec<u32>, StopReason)> {
    let mut ids = Vec::new();
    let mut hidden = hidden.clone();
    loop {
        if ids.len() >= max_new_tokens {
            return Ok((ids, StopReason::MaxTokens));
        }
        let logits = session
            .model()
            .text_logits(&hidden.unsqueeze(0)?)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let id = sampler.sample(&logits);
        if Some(id) == stop_token {
            return Ok((ids, StopReason::StopToken));
        }
        ids.push(id);
        if !on_token(id)? {
            return Ok((ids, StopReason::Cancelled));
        }
        if ids.len() >= max_new_tokens {
            return Ok((ids, StopReason::MaxTokens));
        }
        if session.remaining() == 0 {
            return Ok((ids, StopReason::ContextFull));
        }
        hidden = session.step_text(id)?;
    }
}
