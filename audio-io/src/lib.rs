//! Live audio for lfm2d: capture and playback through the sound card (cpal) with lock-free rings,
//! WAV/file and in-memory devices for batch use and tests, resampling to the model's 16 kHz, and
//! voice activity detection.
//!
//! Not for: anything that touches the model. This crate moves and measures samples only.
pub mod file;
pub mod segment;
