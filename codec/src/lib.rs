//! Audio codes to 24 kHz waveform: the LFM2 audio detokenizer (with its streaming ISTFT) and the
//! Mimi decoder, both behind one streaming [`Detokenizer`] trait.
//!
//! A frame is 8 codes (one per codebook, each in `0..2048`) and stands for 80 ms of audio, 1920
//! samples at 24 kHz. Both decoders are causal, so they stream: every [`Detokenizer::push`]
//! returns the samples that no later frame can change, and a stream's concatenated output equals
//! the batch [`Detokenizer::decode`] of the same frames.
//!
//! - [`Lfm2Detokenizer`] (LFM2.5-Audio's `audio_detokenizer/`): holds back 480 samples (20 ms) of
//!   ISTFT overlap, so it returns 1440 samples for the first frame, 1920 for each later one and
//!   the last 480 at [`Detokenizer::flush`].
//! - [`MimiDecoder`] (Kyutai's Mimi, LFM2-Audio-1.5B's codec): 1920 samples per frame, nothing
//!   held back.
//!
//! [`DecodeThread`] runs any of them on a thread of its own, fed through a channel.
//!
//! Not for: generating codes (that is `lfm2-audio`) or playing audio (that is `audio-io`).

pub mod decode_thread;
pub mod istft;
pub mod lfm2_detokenizer;
pub mod mimi;

use std::path::Path;

use lfm2_audio::format::{Frame, AUDIO_CODES, END_OF_AUDIO, OUTPUT_SAMPLE_RATE, SAMPLES_PER_FRAME};

pub use decode_thread::{DecodeThread, Decoded};
pub use lfm2_audio::error::{Error, Result};
pub use lfm2_detokenizer::Lfm2Detokenizer;
pub use mimi::MimiDecoder;

/// A streaming decoder from audio frames to 24 kHz mono samples.
///
/// One instance decodes one stream (an utterance) at a time: `push` every frame as it is
/// generated, then `flush` once at the end, which also makes the decoder ready for the next
/// utterance. A frame with a code outside `0..2048` (such as the end-of-audio frame) is an
/// error that leaves the stream untouched. After any other error the stream is reset.
pub trait Detokenizer: Send {
    /// Output sample rate (24 000).
    fn sample_rate(&self) -> u32 {
        OUTPUT_SAMPLE_RATE
    }

    /// Samples a pushed frame holds back until the next frame or `flush` (0 for Mimi, 480 for
    /// the LFM2 detokenizer): the algorithmic latency on top of the frame itself.
    fn lookahead(&self) -> usize;

    /// Decodes one frame and appends the samples that became final to `out`; returns how many.
    fn push_into(&mut self, frame: &Frame, out: &mut Vec<f32>) -> Result<usize>;

    /// Ends the stream: appends the samples still held back to `out`, returns how many, and
    /// resets the decoder for the next stream.
    fn flush_into(&mut self, out: &mut Vec<f32>) -> Result<usize>;

    /// Forgets the stream in progress, discarding what it held back.
    fn reset(&mut self);

    /// Decodes a whole utterance at once, as the reference's batch decode does. It does not
    /// touch the stream in progress; the result equals pushing every frame and flushing, up to
    /// float rounding (the same sums are computed in differently shaped products).
    fn decode(&self, frames: &[Frame]) -> Result<Vec<f32>>;

    /// [`push_into`](Self::push_into) into a new vector.
    fn push(&mut self, frame: &Frame) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(SAMPLES_PER_FRAME);
        self.push_into(frame, &mut out)?;
        Ok(out)
    }

    /// [`flush_into`](Self::flush_into) into a new vector.
    fn flush(&mut self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.flush_into(&mut out)?;
        Ok(out)
    }
}

/// Checks that every code of every frame is an audio code (below 2048). `first_index` is the
/// index of `frames[0]` in the stream, for the message.
pub fn check_frames(frames: &[Frame], first_index: usize) -> Result<()> {
    for (i, frame) in frames.iter().enumerate() {
        if let Some((c, &code)) = frame
            .iter()
            .enumerate()
            .find(|(_, &code)| code >= AUDIO_CODES)
        {
            let what = if code == END_OF_AUDIO {
                " (2048 marks the end of audio; end-of-audio frames must not be decoded)"
            } else {
                ""
            };
            return Err(Error::Invalid(format!(
                "audio frame {}: code {code} in codebook {c} is not an audio code, expected 0..{}{what}",
                first_index + i,
                AUDIO_CODES - 1
            )));
        }
    }
    Ok(())
}

/// Which decoder [`open_detokenizer`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetokenizerChoice {
    /// The LFM2 detokenizer when the model directory has `audio_detokenizer/`, else Mimi.
    #[default]
    Auto,
    /// The LFM2 detokenizer (`audio_detokenizer/`, LFM2.5-Audio only).
    Lfm2,
    /// The Mimi decoder (`tokenizer-e351c8d8-checkpoint125.safetensors`).
    Mimi,
}

/// Loads the decoder `choice` names from a model directory in the Hugging Face layout, in f32.
pub fn open_detokenizer(
    model_dir: &Path,
    choice: DetokenizerChoice,
) -> Result<Box<dyn Detokenizer>> {
    open_detokenizer_with(model_dir, choice, &lfm2_audio::weights::QuantPlan::f32())
}

/// As [`open_detokenizer`], with the LFM2 detokenizer's matrices stored in the auxiliary format
/// of `plan` (Q8_0 when the model is quantized; Mimi stays in f32).
pub fn open_detokenizer_with(
    model_dir: &Path,
    choice: DetokenizerChoice,
    plan: &lfm2_audio::weights::QuantPlan,
) -> Result<Box<dyn Detokenizer>> {
    let plan = lfm2_audio::weights::QuantPlan {
        decode: plan.auxiliary,
        auxiliary: plan.auxiliary,
        threads: plan.threads.clone(),
    };
    if !model_dir.is_dir() {
        return Err(Error::MissingFile {
            path: model_dir.to_owned(),
            what: "model directory",
        });
    }
    let detok_dir = model_dir.join(lfm2_detokenizer::DIR);
    let mimi_file = model_dir.join(lfm2_audio::model::MIMI_FILE);
    match choice {
        DetokenizerChoice::Lfm2 => Ok(Box::new(Lfm2Detokenizer::load_with(&detok_dir, plan)?)),
        DetokenizerChoice::Mimi => Ok(Box::new(MimiDecoder::load(&mimi_file)?)),
        DetokenizerChoice::Auto => {
            if detok_dir.is_dir() {
                Ok(Box::new(Lfm2Detokenizer::load_with(&detok_dir, plan)?))
            } else if mimi_file.exists() {
                Ok(Box::new(MimiDecoder::load(&mimi_file)?))
            } else {
                Err(Error::MissingFile {
                    path: model_dir.to_owned(),
                    what:
                        "no audio decoder: neither audio_detokenizer/ (LFM2.5-Audio) nor \
                           tokenizer-e351c8d8-checkpoint125.safetensors (Mimi) is in this directory",
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_of_audio_and_out_of_range_codes_are_named() {
        assert!(check_frames(&[[0, 1, 2, 3, 4, 5, 6, 2047]], 0).is_ok());
        let err = check_frames(&[[0; 8], [2048; 8]], 5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("audio frame 6"), "{err}");
        assert!(err.contains("codebook 0"), "{err}");
        assert!(err.contains("end of audio"), "{err}");
        let err = check_frames(&[[0, 0, 0, 9999, 0, 0, 0, 0]], 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("code 9999 in codebook 3"), "{err}");
        assert!(!err.contains('\n'));
    }
}
