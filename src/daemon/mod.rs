//! The daemon (`lfm2d serve`); the model runs in `crate::engine`.
//!
//! - [`setup`]: arguments, configuration, model loading, sampling, tools and sound devices,
//!   shared by every front end (the voice loop, the modes, the Realtime and Wyoming servers);
//! - [`serve`]: `run`, which picks the front ends;
//! - [`voice`]: the voice assistant's loop on the microphone and speaker;
//! - [`modes`]: live transcription, translation and reading text aloud;
//! - [`console`]: the stamped log lines;
//! - [`shutdown`]: stopping cleanly on SIGINT and SIGTERM.
pub mod console;
pub mod modes;
pub mod serve;
pub mod setup;
pub mod shutdown;
pub mod voice;
