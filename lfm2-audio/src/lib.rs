//! LFM2-Audio on candle, on the CPU.
//!
//! What is here: the checkpoint's configuration ([`config`]) and weights ([`weights`], [`model`]),
//! the generic LFM2 stack ([`lfm2`]) used by the backbone ([`backbone`]) and by the LFM2 audio
//! detokenizer, the tokenizer and chat prompt ([`tokenizer`], [`prompt`]), sampling
//! ([`sampling`]), the conversation state with exact truncation ([`session`]) and the generation
//! loops ([`generate`]). Everything computes in f32.
//!
//! Not for: threads, devices or networking. This crate only loads files and computes.

pub mod audio;
pub mod backbone;
pub mod cache;
pub mod config;
pub mod conformer;
pub mod depthformer;
pub mod error;
pub mod format;
pub mod generate;
pub mod lfm2;
pub mod mel;
pub mod model;
pub mod nn;
pub mod ops;
pub mod prompt;
pub mod quant;
pub mod resample;
pub mod sampling;
pub mod session;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
