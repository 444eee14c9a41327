//! Generation loops over a [`Session`].

use candle_core::Tensor;

use crate::depthformer::AudioHead;
use crate::error::Result;
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

/// The reference's generation loops as a pull-based state machine: each [`Generator::next`]
/// runs one backbone step (feeding back what the previous call yielded) and samples one text token
/// or one audio frame. Between two calls the caller may stop, which is how a reply is cancelled
/// within one decode step.
pub struct Generator<'a> {
    session: &'a mut Session,
    head: &'a AudioHead,
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
    finished: bool,
}

impl<'a> Generator<'a> {
    /// Starts generating after a prefill whose last hidden state is `hidden`.
    pub fn new(
        session: &'a mut Session,
        head: &'a AudioHead,
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
            session,
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
            finished: false,
        }
    }

    /// Goes on in audio, as after an `<|audio_start|>` that was teacher-forced in the prefill
    /// rather than generated (sequential mode).
    pub fn continue_in_audio(&mut self) {
        self.modality = Modality::Audio;
    }

    /// Backbone steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Whether the reply has ended (stop token, end-of-audio handling, or the step limit).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The final-normed backbone state the last item was sampled from.
    pub fn last_hidden(&self) -> Option<&Tensor> {
        self.last_hidden.as_ref()
    }

    /// The session being extended.
    pub fn session(&self) -> &Session {
        self.session
    }

    /// Runs the backbone on the last yielded item, if it has not run yet, so that the session
    /// holds everything yielded. Call it when the reply is over to keep the history complete.
    pub fn feed_pending(&mut self) -> Result<Option<Tensor>> {
        let Some(token) = self.pending.take() else {
            return Ok(None);
        };
        if self.session.remaining() == 0 {
            return Err(crate::error::Error::Invalid(
                "the conversation has reached the model's context limit".into(),
            ));
        }
        let hidden = match &token {
            Token::Text(id) => self.session.step_text(*id)?,
            Token::Audio(frame) => self
                .session
                .step(&self.head.frame_embedding(frame)?, Item::AudioOut)?,
        };
        Ok(Some(hidden))
    }

    /// Generates the next item, or `None` when the reply is over.
    pub fn next_item(&mut self) -> Result<Option<Token>> {
        if self.finished
            || self.steps >= self.max_new_tokens
            || (self.hidden.is_none() && self.session.remaining() == 0)
        {
            self.finished = true;
            return Ok(None);
        }
        let hidden = match self.hidden.take() {
            Some(h) => h,
            None => self
                .feed_pending()?
                .ok_or_else(|| crate::error::Error::Invalid("nothing to continue from".into()))?,
        };
        self.steps += 1;
        self.last_hidden = Some(hidden.clone());
        let token = match self.mode {
            GenerationMode::Interleaved { n_text, n_audio } => {
                self.left -= 1;
                match self.modality {
                    Modality::Text => {
                        let id = self.sample_text(&hidden)?;
                        if id == self.special.im_end {
                            self.finished = true;
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
                        if frame[0] == END_OF_AUDIO {
                            frame.iter_mut().for_each(|c| *c = END_OF_AUDIO);
                            self.modality = Modality::Text;
                        }
                        Token::Audio(frame)
                    }
                }
            }
            GenerationMode::Sequential => match self.modality {
                Modality::Text => {
                    let id = self.sample_text(&hidden)?;
                    if id == self.special.audio_start {
                        self.modality = Modality::Audio;
                    }
                    if id == self.special.im_end {
                        // Yielded, never fed back.
                        self.finished = true;
                        return Ok(Some(Token::Text(id)));
                    }
                    Token::Text(id)
                }
                Modality::Audio => {
                    let mut frame = self.head.sample_frame(&hidden, &mut self.audio_sampler)?;
                    if frame[0] == END_OF_AUDIO {
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

    fn sample_text(&mut self, hidden: &Tensor) -> Result<u32> {
        let logits = self
            .session
            .model()
            .text_logits(&hidden.unsqueeze(0)?)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        Ok(self.text_sampler.sample(&logits))
    }
}
