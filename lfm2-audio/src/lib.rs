//! LFM2-Audio on candle, on the CPU.
//!
//! What is here: the checkpoint's configuration and weights, the generic LFM2 stack (used by the
//! backbone and, later, the LFM2 audio detokenizer), the tokenizer and chat prompt, sampling, and
//! the conversation [`session::Session`] with exact truncation.
//!
//! Not for: threads, devices or networking. This crate only loads files and computes.
