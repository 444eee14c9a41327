//! The voice assistant daemon: the engine thread and the serve loop.

pub mod engine;
pub mod serve;
