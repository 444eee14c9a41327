//! Audio codes to 24 kHz waveform: the LFM2 audio detokenizer (with its streaming ISTFT) and the
//! Mimi decoder, both behind one streaming `Detokenizer` trait.
//!
//! Not for: generating codes (that is `lfm2-audio`) or playing audio (that is `audio-io`).
