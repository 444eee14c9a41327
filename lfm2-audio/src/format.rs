//! The model's audio at its two ends, named once for the whole workspace: the rate of the
//! waveform the audio encoder takes, and the frames of codes the audio head emits, with the rate
//! and length of the sound a detokenizer makes of each frame.
//!
//! A frame holds one code per codebook. A code below [`AUDIO_CODES`] stands for sound (the
//! detokenizers accept only those); the audio head can also emit [`END_OF_AUDIO`], which ends the
//! audio of a reply and makes no sound. The head therefore chooses among [`CODEBOOK_CLASSES`]
//! (2049) values per codebook, while a codec's codebook holds [`AUDIO_CODES`] (2048).

/// Sample rate of the waveform the audio encoder takes (mono): 16 kHz. Capture, the VAD and
/// every API's input are resampled to it.
pub const INPUT_SAMPLE_RATE: u32 = 16_000;

/// Sample rate of the waveform the detokenizers make of the frames (mono): 24 kHz.
pub const OUTPUT_SAMPLE_RATE: u32 = 24_000;

/// Samples of output waveform per frame: 80 ms at [`OUTPUT_SAMPLE_RATE`] (12.5 frames per
/// second).
pub const SAMPLES_PER_FRAME: usize = 1920;

/// Codebooks per frame.
pub const CODEBOOKS: usize = 8;

/// Codes per codebook that stand for sound (`0..2048`): the codec's codebook size.
pub const AUDIO_CODES: u32 = 2048;

/// The code that ends the audio of a reply (one past the last audio code). Emitted on codebook 0
/// it marks the frame as the end-of-audio frame, which is never decoded.
pub const END_OF_AUDIO: u32 = AUDIO_CODES;

/// Values the audio head chooses among per codebook: the [`AUDIO_CODES`] plus [`END_OF_AUDIO`].
/// It is the width of the head's logits and of each codebook's block of embedding rows.
pub const CODEBOOK_CLASSES: usize = AUDIO_CODES as usize + 1;

/// One audio frame: a code per codebook, in codebook order.
pub type Frame = [u32; CODEBOOKS];
