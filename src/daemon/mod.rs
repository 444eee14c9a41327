//! The voice assistant daemon: the serve loop (the model runs in `crate::engine`).
pub mod serve;
pub mod shutdown;
