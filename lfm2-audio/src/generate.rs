//! Generation loops over a [`Session`].

use candle_core::Tensor;

use crate::error::Result;
use crate::prompt::ChatState;
use crate::sampling::Sampler;
use crate::session::Session;
use crate::tokenizer::TextTokenizer;

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

/// System prompt of speech recognition (the reference's ASR prompt).
pub const ASR_SYSTEM_PROMPT: &str = "Perform ASR.";

/// Text-only generation: from `hidden` (the final-normed state of the last prompt position),
/// sample a token, hand it to `on_token`, feed it back, and repeat until one of `stop_tokens`
/// (not fed back, not returned), `max_new_tokens`, the context limit, or `on_token` returning
/// `false`.
pub fn generate_text(
    session: &mut Session,
    hidden: &Tensor,
    sampler: &mut Sampler,
    max_new_tokens: usize,
    stop_tokens: &[u32],
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
        if stop_tokens.contains(&id) {
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

/// The reference's speech-recognition prompt for one clip: system "Perform ASR.", a user turn
/// holding the audio, and the opened assistant turn.
pub fn asr_chat(tok: &TextTokenizer, audio: Tensor) -> Result<ChatState> {
    let mut chat = ChatState::new(tok)?;
    chat.new_turn(tok, "system")?;
    chat.add_text(tok, ASR_SYSTEM_PROMPT)?;
    chat.end_turn(tok)?;
    chat.new_turn(tok, "user")?;
    chat.add_audio(audio)?;
    chat.end_turn(tok)?;
    chat.new_turn(tok, "assistant")?;
    Ok(chat)
}

/// Prefills a whole chat into a fresh position of `session` and returns the hidden state of its
/// last position.
pub fn prefill_chat(session: &mut Session, chat: &ChatState) -> Result<Tensor> {
    let from = session.len();
    let emb = chat.embeddings(session.model(), from)?;
    let hidden = session.prefill(&emb, &chat.items()[from..])?;
    Ok(hidden.get(hidden.dim(0)? - 1)?)
}
