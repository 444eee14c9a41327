//! The conversation layer of lfm2d: turn-taking, barge-in, conversation history and its
//! truncation to what was actually played, tool calls, and the modes (assistant, transcribe,
//! translate, speak).
//!
//! Not for: running the model or the sound card; it drives them through the engine and audio-io.

pub mod tools;

pub mod reply;
pub mod turn;
