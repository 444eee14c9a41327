//! LFM2-Audio on the CPU: loading a checkpoint and running it, from a 16 kHz waveform and text
//! to text tokens and audio frames. Tensors are candle's, in f32; the large matrices can be
//! block-quantized, with kernels of our own.
//!
//! The modules, from the bottom up:
//! - [`format`]: the model's audio at its two ends (input rate, frames of codes, output rate),
//!   the names the whole workspace uses.
//! - [`config`], [`weights`], [`model`]: the checkpoint's `config.json`, its tensors (in f32, or
//!   quantized as a [`weights::QuantPlan`] says, with a cache of the quantized matrices), and a
//!   loaded model directory.
//! - [`quant`]: quantized matrices, their kernels and the thread pool they run on; [`ops`]:
//!   one-position operations on f32 slices for the decode loops.
//! - [`nn`]: the layers the networks share (linear maps, embedding tables, norms, the SwiGLU
//!   feed-forward, rotary tables); [`cache`]: per-position caches with exact truncation.
//! - [`lfm2`]: the LFM2 stack, used by the [`backbone`] and by `codec`'s LFM2 audio
//!   detokenizer.
//! - [`encoder`]: the audio encoder, waveform → [`mel`] → [`conformer`] and adapter → backbone
//!   embeddings; [`resample`]: resampling to 16 kHz exactly as the reference does.
//! - [`depthformer`]: the audio head (a hidden state to a frame of codes, a frame back to an
//!   embedding).
//! - [`tokenizer`], [`prompt`] (the chat template), [`sampling`], [`session`] (a conversation's
//!   state with exact truncation) and [`generate`] (the generation loops).
//!
//! Not for: devices, networking, or turning frames into sound (that is `codec`). The only threads
//! are the quantized kernels' pool and the scoped ones that quantize weights at load.

pub mod backbone;
pub mod cache;
pub mod config;
pub mod conformer;
pub mod depthformer;
pub mod encoder;
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
