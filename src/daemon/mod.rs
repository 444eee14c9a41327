//! The daemon's parts (`lfm2d serve`, whose `crate::serve::run` picks the front ends); the model
//! runs in `crate::engine`.
//!
//! - [`setup`]: arguments, configuration, model loading, sampling, tools and sound devices,
//!   shared by every front end (the voice loop, the modes, the Realtime and Wyoming servers);
//! - [`voice`]: the voice assistant's loop on the microphone and speaker;
//! - [`modes`]: live transcription, translation and reading text aloud;
//! - [`console`]: the stamped log lines;
//! - [`shutdown`]: stopping cleanly on SIGINT and SIGTERM.
pub mod console;
pub mod modes;
pub mod setup;
pub mod shutdown;
pub mod voice;
