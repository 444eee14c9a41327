//! Playback to a sound card: [`DevicePlayback::write`] resamples to the device's rate and
//! channel count into a lock-free ring that the cpal callback drains, counting what was played,
//! and reopens the stream when the device goes away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cpal::traits::StreamTrait;
use crossbeam_channel::{Receiver, Sender};
use ringbuf::traits::{Observer, Producer};
use ringbuf::HeapProd;

use super::reopen::Reopener;
use super::selection::{DeviceSelector, Direction};
use super::stream::{retire, start_stream, Callback, Started};
use crate::callbacks::{PlaybackCallback, PlaybackShared, PlaybackState};
use crate::{AudioError, DeviceEvent, Playback, StreamFormat, StreamResampler, StreamStats};

/// How long `DevicePlayback::write` keeps trying to reopen a vanished device before it returns
/// an error (capture keeps trying for as long as it is read).
const GIVE_UP: Duration = Duration::from_secs(10);

/// Seconds of audio the ring holds.
const PLAYBACK_RING_SECONDS: usize = 2;

struct OpenPlayback {
    /// Its stream is kept alive: dropping it stops the stream.
    dev: Started<HeapProd<f32>>,
    shared: Arc<PlaybackShared>,
}

impl OpenPlayback {
    fn snapshot(&self) -> StreamStats {
        self.dev.stats(&self.shared.counters)
    }
}

fn open_playback(selector: &DeviceSelector) -> Result<OpenPlayback, AudioError> {
    let shared = Arc::new(PlaybackShared::default());
    let dev = start_stream(
        Direction::Output,
        selector,
        PLAYBACK_RING_SECONDS,
        |prod, cons, channels| {
            let callback = PlaybackCallback::new(cons, channels, Arc::clone(&shared));
            (Callback::Playback(callback), prod)
        },
    )?;
    Ok(OpenPlayback { dev, shared })
}

/// Playback to a sound card. `write` resamples the source audio (24 kHz mono by default) to the
/// device rate, copies it to every channel and queues it in a lock-free ring that the cpal
/// callback drains. The callback counts what it really played.
pub struct DevicePlayback {
    open: Option<OpenPlayback>,
    reopener: Reopener,
    source_rate: u32,
    resampler: StreamResampler,
    /// Source samples played by streams closed by reopens.
    played_before: u64,
    previous: StreamStats,
    resampled: Vec<f32>,
    interleaved: Vec<f32>,
    events_tx: Sender<DeviceEvent>,
    events_rx: Receiver<DeviceEvent>,
    /// Between the first `write` of a stream and its `finish` or `clear`.
    streaming: bool,
    /// The stream is paused ([`DevicePlayback::suspend`]); the next `write` resumes it.
    paused: bool,
}

impl DevicePlayback {
    /// Opens the selected output device with its default format, for mono input at
    /// `source_rate` (use [`lfm2_audio::format::OUTPUT_SAMPLE_RATE`] for the model's voice).
    pub fn open(selector: &DeviceSelector, source_rate: u32) -> Result<Self, AudioError> {
        let open = open_playback(selector)?;
        let resampler = StreamResampler::new(source_rate, open.dev.format.sample_rate)?;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let reopener = Reopener {
            selector: selector.clone(),
            device: open.dev.name.clone(),
            failure: Arc::clone(&open.dev.failure),
            down: None,
        };
        Ok(Self {
            open: Some(open),
            reopener,
            source_rate,
            resampler,
            played_before: 0,
            previous: StreamStats::default(),
            resampled: Vec::new(),
            interleaved: Vec::new(),
            events_tx,
            events_rx,
            streaming: false,
            paused: false,
        })
    }

    /// Pauses the device stream if it has nothing to play, so that an idle speaker costs no
    /// callbacks (50 a second, each through the sound server); the next `write` resumes it.
    /// Returns whether it is paused. A device that cannot pause just goes on.
    pub fn suspend(&mut self) -> bool {
        if self.paused {
            return true;
        }
        let Some(open) = &self.open else { return false };
        if self.streaming
            || open.shared.state() != PlaybackState::Idle
            || open.dev.ring.occupied_len() > 0
        {
            return false;
        }
        self.paused = open.dev.stream.pause().is_ok();
        self.paused
    }

    fn resume(&mut self) {
        if !std::mem::take(&mut self.paused) {
            return;
        }
        if let Some(open) = &self.open {
            // Not a stall: the stream was quiet on purpose.
            open.shared.counters.touch();
            // A stream that does not come back stops calling back: the stall check finds it
            // and reopens the device.
            let _ = open.dev.stream.play();
        }
    }

    /// The device's format (what the callback writes).
    pub fn device_format(&self) -> Option<StreamFormat> {
        self.open.as_ref().map(|o| o.dev.format)
    }

    /// Device events (lost, reopened) as they happen.
    pub fn device_events(&self) -> Receiver<DeviceEvent> {
        self.events_rx.clone()
    }

    fn played_in(open: &OpenPlayback, source_rate: u32) -> u64 {
        let frames = open.shared.counters.snapshot().frames;
        (u128::from(frames) * u128::from(source_rate) / u128::from(open.dev.format.sample_rate))
            as u64
    }

    /// Drops the current stream (keeping its counts) after a failure.
    fn close(&mut self) {
        if let Some(open) = self.open.take() {
            self.played_before += Self::played_in(&open, self.source_rate);
            self.previous.merge(&open.snapshot());
            retire(open.dev.stream);
        }
    }

    /// Makes sure a stream is open, reopening with backoff; errors once the device has been
    /// gone for `give_up`.
    fn ensure_open(&mut self, give_up: Duration) -> Result<(), AudioError> {
        self.resume();
        if let Some(open) = &self.open {
            if let Some(event) = self.reopener.check(&open.shared.counters) {
                let _ = self.events_tx.send(event);
                self.close();
            }
        }
        let started = Instant::now();
        while self.open.is_none() {
            match self.reopener.retry(open_playback) {
                Some((mut event, Some(open))) => {
                    if let DeviceEvent::Reopened { format, device, .. } = &mut event {
                        *format = open.dev.format;
                        *device = open.dev.name.clone();
                    }
                    self.resampler =
                        StreamResampler::new(self.source_rate, open.dev.format.sample_rate)?;
                    self.reopener.attach(&open.dev.failure);
                    if self.streaming {
                        open.shared.set_state(PlaybackState::Playing);
                    }
                    self.open = Some(open);
                    let _ = self.events_tx.send(event);
                }
                Some((event, None)) => {
                    let message = event.to_string();
                    let _ = self.events_tx.send(event);
                    if started.elapsed() >= give_up {
                        return Err(AudioError::PlaybackLost(message));
                    }
                }
                None => {
                    let next = self.reopener.next_retry().unwrap_or_else(Instant::now);
                    std::thread::sleep(
                        next.saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(50)),
                    );
                }
            }
        }
        Ok(())
    }

    /// Resampled mono → interleaved device frames → ring, waiting for room. A device that
    /// fails meanwhile is reopened (what it had queued is lost with it).
    fn queue(&mut self) -> Result<(), AudioError> {
        let mut pos = 0;
        while pos < self.resampled.len() {
            self.ensure_open(GIVE_UP)?;
            let Some(open) = self.open.as_mut() else {
                continue;
            };
            let channels = usize::from(open.dev.format.channels);
            let frames = (open.dev.ring.vacant_len() / channels).min(self.resampled.len() - pos);
            if frames == 0 {
                // Full: the callback drains a period at a time. `ensure_open` above notices a
                // stream that stopped calling back, so a dead device cannot hang the writer.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            self.interleaved.clear();
            self.interleaved.extend(
                self.resampled[pos..pos + frames]
                    .iter()
                    .flat_map(|&s| std::iter::repeat_n(s, channels)),
            );
            let pushed = open.dev.ring.push_slice(&self.interleaved);
            debug_assert_eq!(pushed, self.interleaved.len());
            pos += frames;
        }
        self.resampled.clear();
        Ok(())
    }
}

impl Playback for DevicePlayback {
    fn source_rate(&self) -> u32 {
        self.source_rate
    }

    fn write(&mut self, samples: &[f32]) -> Result<(), AudioError> {
        self.ensure_open(GIVE_UP)?;
        // After a clear, the callback drops what the ring holds at its next period: audio
        // queued before then would go with it. Wait for it (a period or two; a stream that
        // stopped calling back is not waited for).
        if let Some(open) = &self.open {
            let deadline = Instant::now() + Duration::from_millis(100);
            while open.shared.clear_pending() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.streaming = true;
        self.resampler.process(samples, &mut self.resampled);
        let queued = self.queue();
        // Playing from when the samples are in the ring: marked before, a callback in between
        // would find the stream begun and nothing to play.
        if let Some(open) = &self.open {
            open.shared.set_state(PlaybackState::Playing);
        }
        queued
    }

    fn finish(&mut self) -> Result<(), AudioError> {
        self.resampler.flush(&mut self.resampled);
        self.queue()?;
        self.streaming = false;
        if let Some(open) = &self.open {
            open.shared.set_state(PlaybackState::Draining);
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.streaming = false;
        self.resampler.reset();
        if let Some(open) = &self.open {
            open.shared.request_clear();
        }
    }

    fn played(&self) -> u64 {
        self.played_before
            + self
                .open
                .as_ref()
                .map_or(0, |o| Self::played_in(o, self.source_rate))
    }

    fn wait_idle(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(open) = &self.open else { return false };
            if open.shared.state() == PlaybackState::Idle {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stats(&self) -> StreamStats {
        let mut stats = self.previous;
        if let Some(open) = &self.open {
            stats.merge(&open.snapshot());
        }
        stats
    }
}
