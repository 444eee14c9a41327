use std::path::PathBuf;

/// Everything that can go wrong while moving audio. Each message says what was wrong and, where
/// there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("no audio {direction} device found{hint}")]
    NoDevice {
        direction: &'static str,
        hint: String,
    },
    #[error("no {direction} device matches {wanted:?}; available: {available}")]
    DeviceNotFound {
        direction: &'static str,
        wanted: String,
        available: String,
    },
    #[error("audio device {device:?}: {message}")]
    Device { device: String, message: String },
    #[error("unusable stream format: {0}")]
    BadFormat(String),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("resampler: {0}")]
    Resample(String),
    #[error("the playback device is gone and could not be reopened: {0}")]
    PlaybackLost(String),
}

impl AudioError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        AudioError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
