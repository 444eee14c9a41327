//! The LFM2 text tokenizer (byte-level BPE from the checkpoint's `tokenizer.json`) and the
//! special tokens the generation loops depend on.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Ids of the special tokens the model's loops use. They are looked up by name in
/// `tokenizer.json` and checked against the ids the reference hard-codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `<|startoftext|>`, the first position of every conversation.
    pub start_of_text: u32,
    /// `<|im_start|>`, opens a turn.
    pub im_start: u32,
    /// `<|im_end|>`, ends a turn; generation stops on it.
    pub im_end: u32,
    /// `<|audio_start|>`, switches sequential generation to audio.
    pub audio_start: u32,
    /// `<|text_end|>`, ends the text of an interleaved reply.
    pub text_end: u32,
}

/// Names and the ids the reference implementation hard-codes for them.
const EXPECTED: [(&str, u32); 5] = [
    ("<|startoftext|>", 1),
    ("<|im_start|>", 6),
    ("<|im_end|>", 7),
    ("<|audio_start|>", 128),
    ("<|text_end|>", 130),
];

/// A loaded tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("special", &self.special)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and checks the special tokens.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.to_owned(),
                what: "text tokenizer",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_owned(),
            message: format!("cannot load: {e}"),
        })?;
        let mut ids = [0u32; 5];
        for (slot, (name, expected)) in ids.iter_mut().zip(EXPECTED) {
            let id = inner.token_to_id(name).ok_or_else(|| Error::Tokenizer {
                path: path.to_owned(),
                message: format!("has no token {name}; LFM2-Audio needs it (id {expected})"),
            })?;
            if id != expected {
                return Err(Error::Tokenizer {
                    path: path.to_owned(),
                    message: format!("token {name} has id {id}, LFM2-Audio expects {expected}"),
                });
            }
            *slot = id;
        }
        let special = SpecialTokens {
            start_of_text: ids[0],
            im_start: ids[1],
            im_end: ids[2],
            audio_start: ids[3],
            text_end: ids[4],
        };
        Ok(Self {
            inner,
            special,
            path: path.to_owned(),
        })
    }

    pub fn special(&self) -> SpecialTokens {
        self.special
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes one piece of text without a BOS/EOS template. Special tokens written in the text
    /// (e.g. `<|im_start|>`) are recognised as single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            message: format!("cannot decode {ids:?}: {e}"),
        })
    }

    /// Decodes ids to readable text: special tokens (`<|text_end|>`, `<|audio_start|>`, ...) are
    /// left out.
    pub fn decode_readable(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            message: format!("cannot decode {ids:?}: {e}"),
        })
    }

    /// The text of one id, as stored in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Turns a stream of token ids into a stream of text pieces, holding back bytes that do not yet
/// form complete UTF-8 characters (byte-level BPE splits multi-byte characters across tokens).
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_owned();
        self.emitted = text.len();
        Ok(Some(piece))
    }

    /// The whole text so far.
    pub fn text(&self, tok: &TextTokenizer) -> Result<String> {
        tok.decode(&self.ids)
    }
}
