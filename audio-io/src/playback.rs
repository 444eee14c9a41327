use std::time::Duration;

use crate::{AudioError, StreamStats};

/// A sink for the assistant's voice: mono `f32` at [`lfm2_audio::format::OUTPUT_SAMPLE_RATE`] (24 kHz)
/// unless the implementation was opened with another source rate.
///
/// Implementations: [`crate::DevicePlayback`] (a sound card through cpal, resampled to the
/// device's rate and channel count), [`crate::WavPlayback`] and [`crate::MemoryPlayback`].
///
/// A stream of audio is a sequence of `write` calls closed by `finish`. Running out of queued
/// audio before `finish` is an underrun (counted in [`StreamStats::xruns`]); after `finish` it is
/// the end of the stream.
pub trait Playback: Send {
    /// The sample rate `write` expects.
    fn source_rate(&self) -> u32;

    /// Queues samples for playing. Waits while the queue is full (never longer than the audio
    /// already queued takes to play); a device that vanished is reopened first.
    fn write(&mut self, samples: &[f32]) -> Result<(), AudioError>;

    /// Marks the end of the current stream: the queued audio plays out, then silence.
    fn finish(&mut self) -> Result<(), AudioError>;

    /// Drops everything queued and not yet played (barge-in). `played` stops where it is.
    fn clear(&mut self);

    /// Samples (at the source rate) that have really been played: what the listener heard.
    fn played(&self) -> u64;

    /// Waits until everything queued has been played, at most `timeout`. True when done.
    fn wait_idle(&mut self, timeout: Duration) -> bool;

    /// Counters of the stream (underruns, callback timing, frames played at the device rate).
    fn stats(&self) -> StreamStats;
}
