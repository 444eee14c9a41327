//! Transcripts of user turns for the record, made when the engine has nothing else to do.
//!
//! Such a transcript must never hold up a reply. It is made in small steps (a few positions of
//! its prompt, or one token) and gives way between any two of them as soon as a job comes; what
//! it has done is kept, and the next idle moment takes it up where it stopped. The clip's encoding
//! is the one its conversation item was made from, when that is still at hand, so the encoder
//! (which cannot stop half-way) does not run again.
//!
//! The prompt always goes through in the same pieces, whether the transcript gives way or not:
//! a transcript made in many sittings is the one made in a single sitting.

use candle_core::Tensor;
use lfm2_audio::generate::{asr_chat, TextSteps};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::Item;
use lfm2_audio::sampling::{Sampler, SamplingParams};
use lfm2_audio::session::Session;

use super::worker::strip_specials;

/// Prompt positions prefilled between two chances to give way: a small piece costs a weight read
/// of its own, but it keeps a reply that comes meanwhile waiting for tens of milliseconds, not for
/// the whole prompt.
pub(crate) const PIECE: usize = 4;

/// A transcription waiting for, or between, its idle moments.
pub(crate) struct Background {
    pub(crate) conv: u64,
    pub(crate) item_id: String,
    pub(crate) audio: Vec<f32>,
    progress: Option<Progress>,
}

/// How far a transcript got.
struct Progress {
    session: Session,
    /// The prompt's input embeddings and kinds, and how many of its positions are prefilled.
    prompt: Tensor,
    items: Vec<Item>,
    done: usize,
    /// The tokens, once the prompt is in.
    steps: Option<TextSteps>,
    sampler: Sampler,
}

impl Background {
    pub(crate) fn new(conv: u64, item_id: String, audio: Vec<f32>) -> Self {
        Self {
            conv,
            item_id,
            audio,
            progress: None,
        }
    }

    /// Positions of the transcript's session so far (prompt and tokens).
    #[cfg(test)]
    pub(crate) fn positions(&self) -> usize {
        self.progress.as_ref().map_or(0, |p| p.session.len())
    }

    /// Goes on with the transcript: the text once it is complete, or None when `stop` asked it
    /// to give way (it is called between every two steps). `encode` gives the clip's encoding,
    /// asked for at the first sitting only. At most `max_tokens` tokens.
    pub(crate) fn resume(
        &mut self,
        model: &Lfm2AudioModel,
        encode: impl FnOnce(&[f32]) -> anyhow::Result<Tensor>,
        max_tokens: usize,
        stop: impl Fn() -> bool,
    ) -> anyhow::Result<Option<String>> {
        if stop() {
            return Ok(None);
        }
        let p = match &mut self.progress {
            Some(p) => p,
            None => {
                let chat = asr_chat(&model.tokenizer, encode(&self.audio)?)?;
                let session = Session::new(model.backbone.clone())?;
                let prompt = chat.embeddings(session.model(), 0)?;
                self.progress.insert(Progress {
                    session,
                    prompt,
                    items: chat.items().to_vec(),
                    done: 0,
                    steps: None,
                    sampler: Sampler::new(SamplingParams::GREEDY, 0),
                })
            }
        };
        let im_end = model.tokenizer.special().im_end;
        while p.done < p.items.len() {
            if stop() {
                return Ok(None);
            }
            let n = PIECE.min(p.items.len() - p.done);
            let piece = p.prompt.narrow(0, p.done, n)?;
            let hidden = p.session.prefill(&piece, &p.items[p.done..p.done + n])?;
            p.done += n;
            if p.done == p.items.len() {
                p.steps = Some(TextSteps::new(hidden.get(n - 1)?, max_tokens, &[im_end]));
            }
        }
        let Some(steps) = &mut p.steps else {
            anyhow::bail!("a transcript prompt without positions");
        };
        while steps.ended().is_none() {
            if stop() {
                return Ok(None);
            }
            if steps.sample(&model.backbone, &mut p.sampler)?.is_some() {
                steps.feed(&mut p.session)?;
            }
        }
        let text = strip_specials(&model.tokenizer.decode_readable(steps.ids())?)
            .trim()
            .to_owned();
        Ok(Some(text))
    }
}
