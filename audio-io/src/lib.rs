//! Live audio for lfm2d: capture and playback through the sound card (cpal) with lock-free rings,
//! WAV/file and in-memory devices for batch use and tests, resampling to the model's 16 kHz, and
//! voice activity detection (Silero VAD through ONNX Runtime) with endpointing.
//!
//! Not for: anything that touches the model. This crate moves and measures samples only.
//!
//! The pieces, in the order samples flow through them:
//! - [`decode`]: audio files of any common format (WAV, FLAC, MP3, Ogg) as a stream of mono
//!   samples, and [`segment`]: splitting long recordings at silences.
//! - [`Capture`]: a source of interleaved `f32` frames at its own rate and channel count:
//!   [`DeviceCapture`] (cpal), [`WavCapture`] (a WAV file, real-time paced or as fast as
//!   possible) and [`MemoryCapture`].
//! - [`Listener`]: the capture pump thread. It downmixes, resamples to 16 kHz
//!   ([`StreamResampler`]), runs the [`vad::SileroVad`] and the [`vad::Endpointer`], and sends
//!   [`ListenEvent`]s (levels, speech started/ended with the utterance audio, device events) over a
//!   crossbeam channel.
//! - [`Playback`]: a sink for 24 kHz mono audio (the codec's rate, [`lfm2_audio::format::OUTPUT_SAMPLE_RATE`]) that
//!   counts what was really played: [`DevicePlayback`] (resampled to the device rate and channel
//!   count), [`WavPlayback`] and [`MemoryPlayback`].
//! - [`Player`]: the assistant's speaker: a queue in front of a playback, each reply held back
//!   by the lead its predecessors needed ([`player::ReplyPacing`]), and every chunk written also
//!   pushed to the echo canceller's reference: the rule every speaker writer must follow.
//!
//! - [`echo`]: keeping the assistant from hearing itself: an echo canceller on the 16 kHz
//!   microphone signal with the played audio ([`echo::EchoReference`]) as reference, a gate that
//!   tells the user's barge-in from the echo, and a half-duplex fallback ([`echo::EchoMode`]).
//!   The listener runs it before the VAD ([`Listener::start_with_echo`]).
//!
//! Real-time rules: the cpal data callbacks ([`rt::CaptureCallback`], [`rt::PlaybackCallback`]) only
//! move samples between the device buffer and an SPSC ring and update atomic counters. They do not
//! allocate, lock, log or make system calls; `tests/realtime.rs` checks the allocation part with a
//! counting global allocator.

mod capture;
pub mod decode;
pub mod device;
pub mod echo;
mod error;
mod file;
mod listener;
mod memory;
mod playback;
pub mod player;
pub mod resample;
pub mod rt;
pub mod segment;
pub mod vad;

pub use capture::{Capture, Pacing, ReadOutcome};
pub use device::{
    DeviceCapture, DeviceEvent, DeviceInfo, DevicePlayback, DeviceSelector, Direction,
};
pub use echo::{EchoCanceller, EchoConfig, EchoMode, EchoReference};
pub use error::AudioError;
pub use file::{read_wav, write_wav, WavCapture, WavPlayback};
pub use listener::{ListenEvent, Listener, ListenerConfig};
pub use memory::{MemoryCapture, MemoryPlayback};
pub use playback::Playback;
pub use player::{Player, Speaker};
pub use resample::StreamResampler;
pub use rt::StreamStats;

/// Rate and channel count of an interleaved stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFormat {
    pub sample_rate: u32,
    pub channels: u16,
}

impl StreamFormat {
    pub const fn new(sample_rate: u32, channels: u16) -> Self {
        Self {
            sample_rate,
            channels,
        }
    }

    /// Checks the format can be streamed at all (a zero rate or channel count is a malformed
    /// file or a broken device, not something to divide by).
    pub fn validate(self) -> Result<Self, AudioError> {
        if self.sample_rate == 0 || self.channels == 0 {
            return Err(AudioError::BadFormat(format!(
                "{} Hz with {} channels",
                self.sample_rate, self.channels
            )));
        }
        Ok(self)
    }

    /// Duration of `frames` frames at this rate.
    pub fn frames_to_duration(self, frames: u64) -> std::time::Duration {
        frames_to_duration(frames, self.sample_rate)
    }
}

impl std::fmt::Display for StreamFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} Hz, {} ch", self.sample_rate, self.channels)
    }
}

/// Duration of `frames` samples at `rate` Hz, exact to the nanosecond.
pub fn frames_to_duration(frames: u64, rate: u32) -> std::time::Duration {
    let rate = u64::from(rate.max(1));
    std::time::Duration::new(
        frames / rate,
        ((frames % rate) * 1_000_000_000 / rate) as u32,
    )
}

/// Averages interleaved frames into mono, appending to `out`.
pub fn downmix_into(interleaved: &[f32], channels: u16, out: &mut Vec<f32>) {
    let channels = usize::from(channels.max(1));
    if channels == 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let scale = 1.0 / channels as f32;
    out.extend(
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() * scale),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downmix_averages_channels_and_ignores_partial_frames() {
        let mut out = Vec::new();
        downmix_into(&[1.0, 0.0, 0.5, 0.5, 0.25], 2, &mut out);
        assert_eq!(out, vec![0.5, 0.5]);
        downmix_into(&[0.1, 0.2], 1, &mut out);
        assert_eq!(out, vec![0.5, 0.5, 0.1, 0.2]);
    }

    #[test]
    fn durations_are_exact() {
        assert_eq!(
            frames_to_duration(16_000, 16_000),
            std::time::Duration::from_secs(1)
        );
        assert_eq!(
            frames_to_duration(512, 16_000),
            std::time::Duration::from_millis(32)
        );
        assert_eq!(frames_to_duration(1, 0), std::time::Duration::from_secs(1));
    }

    #[test]
    fn zero_rate_or_channels_is_rejected() {
        assert!(StreamFormat::new(0, 1).validate().is_err());
        assert!(StreamFormat::new(16_000, 0).validate().is_err());
        assert!(StreamFormat::new(16_000, 2).validate().is_ok());
    }
}
