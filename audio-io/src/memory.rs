//! In-memory capture and playback: clips in, samples out, optionally at real-time pace.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{AudioError, Capture, Pacing, Playback, ReadOutcome, StreamFormat, StreamStats};

/// A clip of interleaved samples played as a capture source.
pub struct MemoryCapture {
    samples: Vec<f32>,
    format: StreamFormat,
    pacing: Pacing,
    /// Next sample index (always at a frame boundary).
    pos: usize,
    started: Option<Instant>,
    name: String,
}

impl MemoryCapture {
    /// A source reading `samples` (interleaved, `format.channels` per frame). A trailing partial
    /// frame is dropped.
    pub fn new(
        mut samples: Vec<f32>,
        format: StreamFormat,
        pacing: Pacing,
    ) -> Result<Self, AudioError> {
        let format = format.validate()?;
        let channels = usize::from(format.channels);
        samples.truncate(samples.len() / channels * channels);
        Ok(Self {
            samples,
            format,
            pacing,
            pos: 0,
            started: None,
            name: "memory".into(),
        })
    }

    pub(crate) fn with_name(mut self, name: String) -> Self {
        self.name = name;
        self
    }

    /// Samples that may be read now.
    fn available_until(&mut self, now: Instant) -> usize {
        match self.pacing {
            Pacing::AsFastAsPossible => self.samples.len(),
            Pacing::RealTime => {
                let started = *self.started.get_or_insert(now);
                let elapsed = now.saturating_duration_since(started);
                let frames = (elapsed.as_secs_f64() * f64::from(self.format.sample_rate)) as usize;
                (frames * usize::from(self.format.channels)).min(self.samples.len())
            }
        }
    }
}

impl Capture for MemoryCapture {
    fn format(&self) -> StreamFormat {
        self.format
    }

    fn read(&mut self, buf: &mut [f32], timeout: Duration) -> Result<ReadOutcome, AudioError> {
        if self.pos >= self.samples.len() {
            return Ok(ReadOutcome::End);
        }
        let channels = usize::from(self.format.channels);
        let room = buf.len() / channels * channels;
        if room == 0 {
            return Ok(ReadOutcome::Samples(0));
        }
        let deadline = Instant::now() + timeout;
        // In real time, hand out about 10 ms at a time, like a device period.
        let period = (self.format.sample_rate as usize / 100).max(1) * channels;
        let want = (self.pos + room.min(period)).min(self.samples.len());
        let mut until = self.available_until(Instant::now());
        while until < want {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let missing = (want - until) / channels;
            let wait = crate::frames_to_duration(missing as u64, self.format.sample_rate);
            std::thread::sleep(wait.min(deadline - now).max(Duration::from_micros(200)));
            until = self.available_until(Instant::now());
        }
        let end = until.min(self.pos + room);
        let n = end.saturating_sub(self.pos);
        buf[..n].copy_from_slice(&self.samples[self.pos..end]);
        self.pos = end.max(self.pos);
        Ok(ReadOutcome::Samples(n))
    }

    fn stats(&self) -> StreamStats {
        StreamStats {
            frames: (self.pos / usize::from(self.format.channels)) as u64,
            ..StreamStats::default()
        }
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// Tracks a virtual clock for sinks that have no device: with [`Pacing::RealTime`], `write`
/// waits until the previous samples would have finished playing, so nothing is ever queued and
/// everything written has been "played".
#[derive(Debug)]
pub(crate) struct PacedSink {
    pub(crate) rate: u32,
    pacing: Pacing,
    /// Start of the current stream and the samples written in it.
    stream: Option<(Instant, u64)>,
    pub(crate) written: u64,
}

impl PacedSink {
    pub(crate) fn new(rate: u32, pacing: Pacing) -> Self {
        Self {
            rate,
            pacing,
            stream: None,
            written: 0,
        }
    }

    /// Waits, if pacing, until the stream's audio so far has played; then counts `n` more.
    pub(crate) fn before_write(&mut self, n: usize) {
        if self.pacing == Pacing::RealTime {
            let (start, in_stream) = *self.stream.get_or_insert((Instant::now(), 0));
            let due = start + crate::frames_to_duration(in_stream, self.rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            self.stream = Some((start, in_stream + n as u64));
        }
        self.written += n as u64;
    }

    pub(crate) fn finish(&mut self) {
        if let Some((start, in_stream)) = self.stream.take() {
            let due = start + crate::frames_to_duration(in_stream, self.rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
}

/// Collects what would have been played, for tests and batch jobs.
pub struct MemoryPlayback {
    sink: PacedSink,
    samples: Arc<Mutex<Vec<f32>>>,
}

impl MemoryPlayback {
    /// A sink taking mono audio at `source_rate`.
    pub fn new(source_rate: u32, pacing: Pacing) -> Result<Self, AudioError> {
        StreamFormat::new(source_rate, 1).validate()?;
        Ok(Self {
            sink: PacedSink::new(source_rate, pacing),
            samples: Arc::default(),
        })
    }

    /// A handle on everything played so far.
    pub fn samples(&self) -> Arc<Mutex<Vec<f32>>> {
        Arc::clone(&self.samples)
    }
}

impl Playback for MemoryPlayback {
    fn source_rate(&self) -> u32 {
        self.sink.rate
    }

    fn write(&mut self, samples: &[f32]) -> Result<(), AudioError> {
        self.sink.before_write(samples.len());
        // Not an audio callback: a lock is fine here. A poisoned lock only means a reader panicked.
        self.samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(samples);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), AudioError> {
        self.sink.finish();
        Ok(())
    }

    fn clear(&mut self) {}

    fn played(&self) -> u64 {
        self.sink.written
    }

    fn wait_idle(&mut self, _timeout: Duration) -> bool {
        self.sink.finish();
        true
    }

    fn stats(&self) -> StreamStats {
        StreamStats {
            frames: self.sink.written,
            ..StreamStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(capture: &mut dyn Capture) -> Vec<f32> {
        let mut out = Vec::new();
        let mut buf = [0.0; 300];
        loop {
            match capture.read(&mut buf, Duration::from_secs(1)).unwrap() {
                ReadOutcome::Samples(n) => out.extend_from_slice(&buf[..n]),
                ReadOutcome::End => return out,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn reads_whole_frames_and_ends() {
        let clip: Vec<f32> = (0..1001).map(|i| i as f32).collect();
        let mut capture = MemoryCapture::new(
            clip.clone(),
            StreamFormat::new(8_000, 2),
            Pacing::AsFastAsPossible,
        )
        .unwrap();
        let got = read_all(&mut capture);
        assert_eq!(got, clip[..1000]);
        assert_eq!(capture.stats().frames, 500);
    }

    #[test]
    fn real_time_pacing_takes_the_clip_duration() {
        let clip = vec![0.0; 16_000 / 5]; // 200 ms
        let mut capture =
            MemoryCapture::new(clip, StreamFormat::new(16_000, 1), Pacing::RealTime).unwrap();
        let started = Instant::now();
        assert_eq!(read_all(&mut capture).len(), 3200);
        let took = started.elapsed();
        // A correctness bound, not a speed measurement: real-time means not faster than real time.
        assert!(took >= Duration::from_millis(190), "took {took:?}");
    }

    #[test]
    fn memory_playback_counts_and_keeps_samples() {
        let mut playback = MemoryPlayback::new(24_000, Pacing::AsFastAsPossible).unwrap();
        playback.write(&[0.1, 0.2]).unwrap();
        playback.write(&[0.3]).unwrap();
        playback.finish().unwrap();
        assert_eq!(playback.played(), 3);
        assert_eq!(*playback.samples().lock().unwrap(), vec![0.1, 0.2, 0.3]);
    }
}
