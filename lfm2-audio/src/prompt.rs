//! The chat prompt, built exactly as the reference's `ChatState`: `<|startoftext|>`, then turns
//! `<|im_start|>{role}\n` … `<|im_end|>\n`, each piece tokenized on its own.

use crate::error::Result;
use crate::tokenizer::TextTokenizer;

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
}

impl ChatState {
    /// A conversation holding only `<|startoftext|>`.
    pub fn new(tok: &TextTokenizer) -> Result<Self> {
        let mut chat = Self { items: Vec::new() };
        chat.push_text(tok, "<|startoftext|>")?;
        Ok(chat)
    }

    /// Opens a turn: `<|im_start|>{role}\n`.
    pub fn new_turn(&mut self, tok: &TextTokenizer, role: &str) -> Result<()> {
        self.push_text(tok, &format!("<|im_start|>{role}\n"))
    }

    /// Appends text to the current turn.
    pub fn add_text(&mut self, tok: &TextTokenizer, text: &str) -> Result<()> {
        self.push_text(tok, text)
    }

    /// Closes the current turn: `<|im_end|>\n`.
    pub fn end_turn(&mut self, tok: &TextTokenizer) -> Result<()> {
        self.push_text(tok, "<|im_end|>\n")
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
