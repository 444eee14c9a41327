//! Capture from a sound card: the cpal callback fills a lock-free ring, [`DeviceCapture::read`]
//! drains it and reopens the stream when the device goes away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringbuf::traits::Observer;
use ringbuf::HeapCons;

use super::reopen::Reopener;
use super::selection::{DeviceSelector, Direction};
use super::stream::{retire, start_stream, Callback, Started};
use crate::callbacks::{CaptureCallback, StreamCounters};
use crate::{AudioError, Capture, DeviceEvent, ReadOutcome, StreamFormat, StreamStats};

/// Seconds of audio the ring holds.
const CAPTURE_RING_SECONDS: usize = 2;

struct OpenCapture {
    dev: Started<HeapCons<f32>>,
    counters: Arc<StreamCounters>,
}

impl OpenCapture {
    fn snapshot(&self) -> StreamStats {
        self.dev.stats(&self.counters)
    }
}

fn open_capture(selector: &DeviceSelector) -> Result<OpenCapture, AudioError> {
    let counters = Arc::new(StreamCounters::default());
    let dev = start_stream(
        Direction::Input,
        selector,
        CAPTURE_RING_SECONDS,
        |prod, cons, channels| {
            let callback = CaptureCallback::new(prod, channels, Arc::clone(&counters));
            (Callback::Capture(callback), cons)
        },
    )?;
    Ok(OpenCapture { dev, counters })
}

/// Capture from a sound card. The cpal callback copies into a lock-free ring; `read` takes from
/// it. A failed stream is reopened with backoff (100 ms doubling to 5 s), reported through
/// [`ReadOutcome::Device`].
pub struct DeviceCapture {
    open: Option<OpenCapture>,
    reopener: Reopener,
    format: StreamFormat,
    /// Totals of streams that were closed by a reopen.
    previous: StreamStats,
}

impl DeviceCapture {
    /// Opens the selected input device with its default format, and starts it.
    pub fn open(selector: &DeviceSelector) -> Result<Self, AudioError> {
        let open = open_capture(selector)?;
        let reopener = Reopener {
            selector: selector.clone(),
            device: open.dev.name.clone(),
            failure: Arc::clone(&open.dev.failure),
            down: None,
        };
        Ok(Self {
            format: open.dev.format,
            open: Some(open),
            reopener,
            previous: StreamStats::default(),
        })
    }

    /// Stream counters of the current stream plus those before reopens.
    fn totals(&self) -> StreamStats {
        let mut stats = self.previous;
        if let Some(open) = &self.open {
            stats.merge(&open.snapshot());
        }
        stats
    }

    /// Drops the current stream (keeping its counts) after a failure.
    fn close(&mut self) {
        if let Some(open) = self.open.take() {
            self.previous.merge(&open.snapshot());
            retire(open.dev.stream);
        }
    }
}

impl Capture for DeviceCapture {
    fn format(&self) -> StreamFormat {
        self.format
    }

    fn read(&mut self, buf: &mut [f32], timeout: Duration) -> Result<ReadOutcome, AudioError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(open) = &self.open {
                if let Some(event) = self.reopener.check(&open.counters) {
                    self.close();
                    return Ok(ReadOutcome::Device(event));
                }
            }
            if self.open.is_none() {
                if let Some((mut event, opened)) = self.reopener.retry(open_capture) {
                    if let Some(open) = opened {
                        if let DeviceEvent::Reopened { format, device, .. } = &mut event {
                            *format = open.dev.format;
                            *device = open.dev.name.clone();
                        }
                        // A different rate or channel count is handled by the reader, which
                        // sees the new `format()` after this event.
                        self.format = open.dev.format;
                        self.reopener.attach(&open.dev.failure);
                        self.open = Some(open);
                    }
                    return Ok(ReadOutcome::Device(event));
                }
            }
            let channels = usize::from(self.format.channels);
            if let Some(open) = &mut self.open {
                use ringbuf::traits::Consumer;
                let whole =
                    (open.dev.ring.occupied_len() / channels).min(buf.len() / channels) * channels;
                if whole > 0 {
                    let n = open.dev.ring.pop_slice(&mut buf[..whole]);
                    return Ok(ReadOutcome::Samples(n));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(ReadOutcome::Samples(0));
            }
            // The device delivers a period at a time: sleep until just after the next one is
            // due (a millisecond at a time once it is late), rather than polling every few
            // milliseconds while nothing can have come (that polling was most of what
            // listening to silence cost).
            let mut wait = Duration::from_millis(2);
            if let Some(open) = &self.open {
                let period = open.counters.period_frames();
                if period > 0 {
                    let period = Duration::from_secs_f64(
                        period as f64 / f64::from(self.format.sample_rate.max(1)),
                    );
                    let since = open.counters.since_last_callback();
                    wait = (period.saturating_sub(since) + Duration::from_millis(1))
                        .min(period + Duration::from_millis(1));
                }
            }
            if let Some(next) = self.reopener.next_retry() {
                wait = wait.max(next.saturating_duration_since(now));
            }
            std::thread::sleep(wait.min(deadline - now));
        }
    }

    fn stats(&self) -> StreamStats {
        self.totals()
    }

    fn name(&self) -> String {
        self.reopener.device.clone()
    }
}
