//! Errors of the model crate. Each one says what was wrong and where, in one line.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the checkpoint layout requires is not there.
    #[error("{path}: missing ({what}); expected a model directory in the Hugging Face layout of LiquidAI/LFM2-Audio-1.5B or LFM2.5-Audio-1.5B")]
    MissingFile { path: PathBuf, what: &'static str },

    /// A file exists but could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// config.json is not valid JSON or a value is wrong. `key` is the dotted path of the key.
    #[error("{path}: `{key}`: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },

    /// The safetensors file is truncated, corrupt or not safetensors at all.
    #[error("{path}: not a readable safetensors file ({message})")]
    Safetensors { path: PathBuf, message: String },

    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor has the wrong shape for the configuration.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype the loader does not read.
    #[error("{path}: tensor `{name}` has dtype {dtype}, expected F32, BF16 or F16")]
    TensorDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    /// tokenizer.json could not be loaded or lacks a token the model needs.
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// A request the model cannot serve (too long, bad position, empty input, ...).
    #[error("{0}")]
    Invalid(String),

    /// The caller asked the work to stop before its end (see [`Stop`]); nothing of it is kept.
    #[error("stopped before the end, as asked")]
    Stopped,

    /// A numeric failure inside candle. Not caused by user input.
    #[error("tensor computation failed: {}", first_line(.0))]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Asked between two layers of a long computation (encoding a clip, prefilling many
/// positions): true stops it there with [`Error::Stopped`], leaving things as they were before
/// it began. The layers that run compute exactly what they compute without the question.
pub type Stop<'a> = &'a dyn Fn() -> bool;

/// A [`Stop`] that never stops.
pub fn never() -> bool {
    false
}

/// candle appends a backtrace to some messages; a user needs the first line only.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}
