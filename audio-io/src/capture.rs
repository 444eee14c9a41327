use std::time::Duration;

use crate::{AudioError, DeviceEvent, StreamFormat, StreamStats};

/// What one [`Capture::read`] produced.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadOutcome {
    /// This many samples (whole frames, interleaved) were written to the buffer. Zero means the
    /// timeout passed with nothing new.
    Samples(usize),
    /// Something happened to the device (lost, reopened); reading goes on.
    Device(DeviceEvent),
    /// The source is finished (end of a file or of a memory clip).
    End,
}

/// A source of audio: interleaved `f32` frames at the source's own rate and channel count.
///
/// Implementations: [`crate::DeviceCapture`] (a sound card through cpal),
/// [`crate::WavCapture`] and [`crate::MemoryCapture`].
pub trait Capture: Send {
    /// The rate and channel count of the samples `read` returns.
    fn format(&self) -> StreamFormat;

    /// Copies up to `buf.len()` samples (whole frames) into `buf`, waiting at most `timeout` for
    /// some to arrive.
    fn read(&mut self, buf: &mut [f32], timeout: Duration) -> Result<ReadOutcome, AudioError>;

    /// Counters of the stream so far (overflows, callback timing; frames for every source).
    fn stats(&self) -> StreamStats;

    /// A short human-readable name of the source, for messages.
    fn name(&self) -> String;
}

impl Capture for Box<dyn Capture> {
    fn format(&self) -> StreamFormat {
        (**self).format()
    }
    fn read(&mut self, buf: &mut [f32], timeout: Duration) -> Result<ReadOutcome, AudioError> {
        (**self).read(buf, timeout)
    }
    fn stats(&self) -> StreamStats {
        (**self).stats()
    }
    fn name(&self) -> String {
        (**self).name()
    }
}

/// How a file or memory source delivers its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// No faster than a device would: sample `n` becomes readable `n / rate` after the first read.
    RealTime,
    /// Everything at once (batch jobs, tests).
    AsFastAsPossible,
}
