//! Generation loops over a [`Session`].

use std::sync::Arc;

use candle_core::Tensor;

use crate::backbone::Backbone;
use crate::depthformer::AudioHead;
use crate::error::{Error, Result};
use crate::format::{Frame, END_OF_AUDIO};
use crate::prompt::{ChatState, Item};
use crate::sampling::{Sampler, SamplingParams};
use crate::session::Session;
use crate::tokenizer::{SpecialTokens, TextTokenizer};

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

/// Text-only generation one token at a time, so that a caller can put it aside between two
/// tokens and take it up again (the session and the sampler stay the caller's). Each token is
/// first [sampled](TextSteps::sample), then [fed back](TextSteps::feed); generation ends at a
/// stop token (not fed back, not kept), `max_new_tokens`, or the context limit.
#[derive(Debug, Clone)]
pub struct TextSteps {
    /// The final-normed state of the last position, while another token is to come.
    hidden: Option<Tensor>,
    ids: Vec<u32>,
    max_new_tokens: usize,
    stop_tokens: Vec<u32>,
    ended: Option<StopReason>,
}

impl TextSteps {
    /// Generation from `hidden`, the final-normed state of the last prompt position.
    pub fn new(hidden: Tensor, max_new_tokens: usize, stop_tokens: &[u32]) -> Self {
        let ended = (max_new_tokens == 0).then_some(StopReason::MaxTokens);
        Self {
            hidden: ended.is_none().then_some(hidden),
            ids: Vec::new(),
            max_new_tokens,
            stop_tokens: stop_tokens.to_vec(),
            ended,
        }
    }

    /// Samples the next token from `model`'s text head and keeps it; None once generation has
    /// ended ([`TextSteps::ended`] says why). The token must be [fed](TextSteps::feed) before the
    /// next one is sampled: sampling again before that is an error.
    pub fn sample(&mut self, model: &Backbone, sampler: &mut Sampler) -> Result<Option<u32>> {
        if self.ended.is_some() {
            return Ok(None);
        }
        let Some(hidden) = self.hidden.take() else {
            return Err(Error::Invalid(
                "text generation: the last token was not fed back before the next was asked for"
                    .into(),
            ));
        };
        let logits = model
            .text_logits(&hidden.unsqueeze(0)?)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let id = sampler.sample(&logits);
        if self.stop_tokens.contains(&id) {
            self.ended = Some(StopReason::StopToken);
            return Ok(None);
        }
        self.ids.push(id);
        Ok(Some(id))
    }

    /// Feeds the last sampled token back into `session`, unless generation ends with it (at
    /// `max_new_tokens`, or with the context full).
    pub fn feed(&mut self, session: &mut Session) -> Result<()> {
        let Some(&id) = self.ids.last() else {
            return Ok(());
        };
        if self.ended.is_some() || self.hidden.is_some() {
            return Ok(());
        }
        if self.ids.len() >= self.max_new_tokens {
            self.ended = Some(StopReason::MaxTokens);
        } else if session.remaining() == 0 {
            self.ended = Some(StopReason::ContextFull);
        } else {
            self.hidden = Some(session.step_text(id)?);
        }
        Ok(())
    }

    /// Ends generation here for `reason` (the last token sampled is kept, not fed back).
    pub fn end(&mut self, reason: StopReason) {
        self.hidden = None;
        self.ended.get_or_insert(reason);
    }

    /// Why generation ended, once it has.
    pub fn ended(&self) -> Option<StopReason> {
        self.ended
    }

    /// The tokens so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The tokens, and why generation ended (None while it has not).
    pub fn finish(self) -> (Vec<u32>, Option<StopReason>) {
        (self.ids, self.ended)
    }
}

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
    let mut steps = TextSteps::new(hidden.clone(), max_new_tokens, stop_tokens);
    let model = session.model().clone();
    while let Some(id) = steps.sample(&model, sampler)? {
        if !on_token(id)? {
            steps.end(StopReason::Cancelled);
            break;
        }
        steps.feed(session)?;
    }
    let (ids, ended) = steps.finish();
    Ok((ids, ended.unwrap_or(StopReason::Cancelled)))
}

/// The reference's speech-recognition prompt for one clip: system "Perform ASR.", a user turn
/// holding the audio, and the opened assistant turn.
pub fn asr_chat(tok: &TextTokenizer, audio: Tensor) -> Result<ChatState> {
    audio_chat(tok, ASR_SYSTEM_PROMPT, audio)
}

/// A conversation of one spoken question: the system turn, a user turn holding the audio
/// embeddings, and the opened assistant turn.
pub fn audio_chat(tok: &TextTokenizer, system: &str, audio: Tensor) -> Result<ChatState> {
    let mut chat = ChatState::new(tok)?;
    chat.new_turn(tok, "system")?;
    chat.add_text(tok, system)?;
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

/// What a generation step yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Text(u32),
    /// One 80 ms audio frame, a code per codebook; all 2048 is the end-of-audio frame.
    Audio(Frame),
}

/// How text and audio alternate in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationMode {
    /// `n_text` text tokens, then `n_audio` frames, and so on; after `<|text_end|>` audio only
    /// until end-of-audio. `<|im_end|>` ends the reply and is not yielded.
    Interleaved { n_text: usize, n_audio: usize },
    /// Text until `<|audio_start|>`, then audio until end-of-audio, then text again;
    /// `<|im_end|>` is yielded and ends the reply.
    Sequential,
}

/// Sampling of a reply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub text: SamplingParams,
    pub audio: SamplingParams,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Modality {
    Text,
    Audio,
}

/// Why a reply ended ([`Generation::end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyEnd {
    /// The model emitted `<|im_end|>` (interleaved: not yielded; sequential: yielded last).
    StopToken,
    /// `max_new_tokens` steps were taken.
    MaxTokens,
    /// The conversation reached the model's context limit.
    ContextFull,
}

/// The reference's generation loops as a pull-based state machine that does not hold the
/// conversation: each [`Generation::next_item`] runs one backbone step of the session it is given
/// (feeding back what the previous call yielded) and samples one text token or one audio frame.
/// Between two calls the caller may stop, which is how a reply is cancelled within one decode
/// step, or step another reply in another session, which is how replies are interleaved. Every
/// call must get the session the generation started in.
pub struct Generation {
    head: Arc<AudioHead>,
    special: SpecialTokens,
    mode: GenerationMode,
    text_sampler: Sampler,
    audio_sampler: Sampler,
    max_new_tokens: usize,
    steps: usize,
    modality: Modality,
    /// Steps left in the current block of the interleaved cadence; may go negative, as in the
    /// reference, where only an exact 0 switches.
    left: i64,
    text_done: bool,
    /// The hidden state to sample from next, when it is already computed (after the prefill).
    hidden: Option<Tensor>,
    /// The last yielded item, not yet fed to the backbone.
    pending: Option<Token>,
    /// The hidden state the last item was sampled from.
    last_hidden: Option<Tensor>,
    end: Option<ReplyEnd>,
}

impl Generation {
    /// Starts generating after a prefill whose last hidden state is `hidden`.
    pub fn new(
        head: Arc<AudioHead>,
        special: SpecialTokens,
        mode: GenerationMode,
        params: GenerationParams,
        hidden: Tensor,
    ) -> Self {
        let left = match mode {
            GenerationMode::Interleaved { n_text, .. } => n_text as i64,
            GenerationMode::Sequential => 0,
        };
        Self {
            head,
            special,
            mode,
            text_sampler: Sampler::new(params.text, params.seed),
            audio_sampler: Sampler::new(params.audio, params.seed.wrapping_add(1)),
            max_new_tokens: params.max_new_tokens,
            steps: 0,
            modality: Modality::Text,
            left,
            text_done: false,
            hidden: Some(hidden),
            pending: None,
            last_hidden: None,
            end: None,
        }
    }

    /// Goes on in audio, as after an `<|audio_start|>` that was teacher-forced in the prefill
    /// rather than generated (sequential mode).
    pub fn continue_in_audio(&mut self) {
        self.modality = Modality::Audio;
    }

    /// The generation mode.
    pub fn mode(&self) -> GenerationMode {
        self.mode
    }

    /// The special tokens the generation stops and switches on.
    pub fn special(&self) -> SpecialTokens {
        self.special
    }

    /// Backbone steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Why the reply ended, once it has.
    pub fn end(&self) -> Option<ReplyEnd> {
        self.end
    }

    /// Whether the reply has ended (stop token, the step limit or the context limit).
    pub fn is_finished(&self) -> bool {
        self.end.is_some()
    }

    /// The final-normed backbone state the last item was sampled from.
    pub fn last_hidden(&self) -> Option<&Tensor> {
        self.last_hidden.as_ref()
    }

    /// The audio head frames are sampled and embedded with.
    pub fn head(&self) -> &Arc<AudioHead> {
        &self.head
    }

    /// Runs the backbone on the last yielded item, if it has not run yet, so that the session
    /// holds everything yielded. Call it when the reply is over to keep the history complete.
    pub fn feed_pending(&mut self, session: &mut Session) -> Result<Option<Tensor>> {
        let Some(token) = self.pending.take() else {
            return Ok(None);
        };
        if session.remaining() == 0 {
            return Err(crate::error::Error::Invalid(
                "the conversation has reached the model's context limit".into(),
            ));
        }
        let hidden = match &token {
            Token::Text(id) => session.step_text(*id)?,
            Token::Audio(frame) => {
                session.step(&self.head.frame_embedding(frame)?, Item::AudioOut)?
            }
        };
        Ok(Some(hidden))
    }

    /// Generates the next item in `session`, or `None` when the reply is over (then
    /// [`Generation::end`] says why).
    pub fn next_item(&mut self, session: &mut Session) -> Result<Option<Token>> {
        if self.end.is_some() {
            return Ok(None);
        }
        if self.steps >= self.max_new_tokens {
            self.end = Some(ReplyEnd::MaxTokens);
            return Ok(None);
        }
        if self.hidden.is_none() && session.remaining() == 0 {
            self.end = Some(ReplyEnd::ContextFull);
            return Ok(None);
        }
        let hidden = match self.hidden.take() {
            Some(h) => h,
            None => self
                .feed_pending(session)?
                .ok_or_else(|| crate::error::Error::Invalid("nothing to continue from".into()))?,
        };
        self.steps += 1;
        self.last_hidden = Some(hidden.clone());
        let token = match self.mode {
            GenerationMode::Interleaved { n_text, n_audio } => {
                self.left -= 1;
                match self.modality {
                    Modality::Text => {
                        let id = self.sample_text(session, &hidden)?;
                        if id == self.special.im_end {
                            self.end = Some(ReplyEnd::StopToken);
                            return Ok(None);
                        }
                        if id == self.special.text_end {
                            self.text_done = true;
                        }
                        if self.left == 0 || self.text_done {
                            self.modality = Modality::Audio;
                            self.left = n_audio as i64;
                        }
                        Token::Text(id)
                    }
                    Modality::Audio => {
                        let mut frame = self.head.sample_frame(&hidden, &mut self.audio_sampler)?;
                        if self.left == 0 && !self.text_done {
                            self.modality = Modality::Text;
                            self.left = n_text as i64;
                        }
                        if ends_audio(&frame) {
                            frame.iter_mut().for_each(|c| *c = END_OF_AUDIO);
                            self.modality = Modality::Text;
                        }
                        Token::Audio(frame)
                    }
                }
            }
            GenerationMode::Sequential => match self.modality {
                Modality::Text => {
                    let id = self.sample_text(session, &hidden)?;
                    if id == self.special.audio_start {
                        self.modality = Modality::Audio;
                    }
                    if id == self.special.im_end {
                        // Yielded, never fed back.
                        self.end = Some(ReplyEnd::StopToken);
                        return Ok(Some(Token::Text(id)));
                    }
                    Token::Text(id)
                }
                Modality::Audio => {
                    let mut frame = self.head.sample_frame(&hidden, &mut self.audio_sampler)?;
                    if ends_audio(&frame) {
                        frame.iter_mut().for_each(|c| *c = END_OF_AUDIO);
                        self.modality = Modality::Text;
                    }
                    Token::Audio(frame)
                }
            },
        };
        self.pending = Some(token.clone());
        Ok(Some(token))
    }

    fn sample_text(&mut self, session: &Session, hidden: &Tensor) -> Result<u32> {
        let logits = session
            .model()
            .text_logits(&hidden.unsqueeze(0)?)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        Ok(self.text_sampler.sample(&logits))
    }
}

/// Whether a sampled frame ends the reply's audio: its first code is the end-of-audio code (the
/// reference checks codebook 0 only and then sets every code to it).
pub fn ends_audio(frame: &[u32]) -> bool {
    frame.first() == Some(&END_OF_AUDIO)
}

/// Whether a frame carries sound: no code is the end-of-audio code. The end-of-audio frame does
/// not, nor does a frame that sampled the end-of-audio code on a later codebook only (no decoder
/// takes that code; it is fed back to the model like any frame but stays silent).
pub fn is_audible(frame: &[u32]) -> bool {
    !frame.contains(&END_OF_AUDIO)
}

/// A [`Generation`] bound to one session for its whole life: the simple way to run one reply.
pub struct Generator<'a> {
    session: &'a mut Session,
    generation: Generation,
}

impl<'a> Generator<'a> {
    /// Starts generating after a prefill whose last hidden state is `hidden`.
    pub fn new(
        session: &'a mut Session,
        head: &Arc<AudioHead>,
        special: SpecialTokens,
        mode: GenerationMode,
        params: GenerationParams,
        hidden: Tensor,
    ) -> Self {
        Self {
            session,
            generation: Generation::new(Arc::clone(head), special, mode, params, hidden),
        }
    }

    /// See [`Generation::continue_in_audio`].
    pub fn continue_in_audio(&mut self) {
        self.generation.continue_in_audio();
    }

    /// Backbone steps taken so far.
    pub fn steps(&self) -> usize {
        self.generation.steps()
    }

    /// Whether the reply has ended (stop token, the step limit or the context limit).
    pub fn is_finished(&self) -> bool {
        self.generation.is_finished()
    }

    /// The final-normed backbone state the last item was sampled from.
    pub fn last_hidden(&self) -> Option<&Tensor> {
        self.generation.last_hidden()
    }

    /// The session being extended.
    pub fn session(&self) -> &Session {
        self.session
    }

    /// See [`Generation::feed_pending`].
    pub fn feed_pending(&mut self) -> Result<Option<Tensor>> {
        self.generation.feed_pending(self.session)
    }

    /// Generates the next item, or `None` when the reply is over.
    pub fn next_item(&mut self) -> Result<Option<Token>> {
        self.generation.next_item(self.session)
    }
}
