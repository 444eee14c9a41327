//! The chat prompt, built exactly as the reference's `ChatState`: `<|startoftext|>`, then turns
//! `<|im_start|>{role}\n` … `<|im_end|>\n`, each piece tokenized on its own.

use candle_core::Tensor;

use crate::backbone::Backbone;
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// The tokens that open a turn of `role`: `<|im_start|>{role}\n`.
pub fn turn_start(tok: &TextTokenizer, role: &str) -> Result<Vec<u32>> {
    tok.encode(&format!("<|im_start|>{role}\n"))
}

/// The tokens that close a turn: `<|im_end|>\n`.
pub fn turn_end(tok: &TextTokenizer) -> Result<Vec<u32>> {
    tok.encode("<|im_end|>\n")
}

/// A whole turn of text: its start, `text` tokenized on its own, its end.
pub fn text_turn(tok: &TextTokenizer, role: &str, text: &str) -> Result<Vec<u32>> {
    let mut ids = turn_start(tok, role)?;
    ids.extend(tok.encode(text)?);
    ids.extend(turn_end(tok)?);
    Ok(ids)
}

/// What occupies one backbone position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A text token.
    Text(u32),
    /// One encoder vector of user audio (80 ms).
    AudioIn,
    /// One generated audio frame (8 codes).
    AudioOut,
}

/// A conversation as a sequence of positions, in the order the model sees them.
#[derive(Debug, Clone)]
pub struct ChatState {
    items: Vec<Item>,
    /// Adapter outputs of every audio clip, in order; they fill the `AudioIn` positions.
    audio_in: Vec<Tensor>,
}

impl ChatState {
    /// A conversation holding only `<|startoftext|>`.
    pub fn new(tok: &TextTokenizer) -> Result<Self> {
        let mut chat = Self {
            items: Vec::new(),
            audio_in: Vec::new(),
        };
        chat.push_text(tok, "<|startoftext|>")?;
        Ok(chat)
    }

    /// A continuation of a conversation already in a session: no `<|startoftext|>`.
    pub fn empty() -> Self {
        Self {
            items: Vec::new(),
            audio_in: Vec::new(),
        }
    }

    /// Opens a turn: `<|im_start|>{role}\n`.
    pub fn new_turn(&mut self, tok: &TextTokenizer, role: &str) -> Result<()> {
        let ids = turn_start(tok, role)?;
        self.items.extend(ids.into_iter().map(Item::Text));
        Ok(())
    }

    /// Appends text to the current turn.
    pub fn add_text(&mut self, tok: &TextTokenizer, text: &str) -> Result<()> {
        self.push_text(tok, text)
    }

    /// Closes the current turn: `<|im_end|>\n`.
    pub fn end_turn(&mut self, tok: &TextTokenizer) -> Result<()> {
        let ids = turn_end(tok)?;
        self.items.extend(ids.into_iter().map(Item::Text));
        Ok(())
    }

    /// Appends one audio clip's embeddings (`[n, hidden]`, from the audio encoder) as `n`
    /// `AudioIn` positions, with no marker tokens, as the reference's `add_audio`.
    pub fn add_audio(&mut self, embeddings: Tensor) -> Result<()> {
        let n = embeddings.dims2()?.0;
        self.items.extend(std::iter::repeat_n(Item::AudioIn, n));
        self.audio_in.push(embeddings);
        Ok(())
    }

    /// Input embeddings `[len, hidden]` of positions `from..` : text rows from the backbone's
    /// table, audio rows from the clips in order.
    pub fn embeddings(&self, backbone: &Backbone, from: usize) -> Result<Tensor> {
        let mut parts = Vec::new();
        let mut clip = 0;
        let mut row = 0;
        let mut text_run: Vec<u32> = Vec::new();
        for (pos, item) in self.items.iter().enumerate() {
            match item {
                Item::Text(id) => {
                    if pos >= from {
                        text_run.push(*id);
                    }
                }
                Item::AudioIn => {
                    let emb = self
                        .audio_in
                        .get(clip)
                        .ok_or_else(|| Error::Invalid("audio position without audio".into()))?;
                    if pos >= from {
                        if !text_run.is_empty() {
                            parts.push(backbone.embed_text(&text_run)?);
                            text_run.clear();
                        }
                        parts.push(emb.narrow(0, row, 1)?);
                    }
                    row += 1;
                    if row == emb.dim(0)? {
                        clip += 1;
                        row = 0;
                    }
                }
                Item::AudioOut => {
                    return Err(Error::Invalid(
                        "generated audio frames are fed by the generation loop".into(),
                    ));
                }
            }
        }
        if !text_run.is_empty() {
            parts.push(backbone.embed_text(&text_run)?);
        }
        if parts.is_empty() {
            return Err(Error::Invalid(format!("no positions from {from} on")));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Appends already generated positions (text tokens and audio frames of a reply).
    pub fn extend(&mut self, items: impl IntoIterator<Item = Item>) {
        self.items.extend(items);
    }

    fn push_text(&mut self, tok: &TextTokenizer, text: &str) -> Result<()> {
        self.items
            .extend(tok.encode(text)?.into_iter().map(Item::Text));
        Ok(())
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The text token ids, in order (audio positions skipped).
    pub fn text_ids(&self) -> Vec<u32> {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::Text(id) => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// A text-only chat: optional system turn, one user turn, and the opened assistant turn.
    pub fn text_chat(tok: &TextTokenizer, system: Option<&str>, user: &str) -> Result<Self> {
        let mut chat = Self::new(tok)?;
        if let Some(system) = system {
            chat.new_turn(tok, "system")?;
            chat.add_text(tok, system)?;
            chat.end_turn(tok)?;
        }
        chat.new_turn(tok, "user")?;
        chat.add_text(tok, user)?;
        chat.end_turn(tok)?;
        chat.new_turn(tok, "assistant")?;
        Ok(chat)
    }
}
