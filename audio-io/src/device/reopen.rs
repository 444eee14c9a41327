//! Surviving a device that goes away: a running stream is watched for a fatal error or a stall,
//! then reopened with backoff (100 ms doubling to 5 s), each step reported as a [`DeviceEvent`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::selection::DeviceSelector;
use super::stream::Failure;
use crate::callbacks::StreamCounters;
use crate::{AudioError, StreamFormat};

/// Something that happened to a device stream while it was running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The stream failed (device unplugged, server gone, stream stalled); reopening begins.
    Lost { device: String, reason: String },
    /// A reopen attempt failed; the next comes after `retry_in`.
    ReopenFailed {
        device: String,
        attempt: u32,
        error: String,
        retry_in: Duration,
    },
    /// The stream runs again, possibly on a replacement device (the default may have changed).
    Reopened {
        device: String,
        format: StreamFormat,
        attempts: u32,
        after: Duration,
    },
}

impl std::fmt::Display for DeviceEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceEvent::Lost { device, reason } => write!(f, "device {device:?} lost: {reason}"),
            DeviceEvent::ReopenFailed {
                device,
                attempt,
                error,
                retry_in,
            } => write!(
                f,
                "reopening {device:?} failed (attempt {attempt}): {error}; retrying in {retry_in:?}"
            ),
            DeviceEvent::Reopened {
                device,
                format,
                attempts,
                after,
            } => write!(
                f,
                "device {device:?} reopened ({format}) after {after:?} and {attempts} attempt(s)"
            ),
        }
    }
}

/// How long a running stream may go without a callback before it counts as lost. Generous:
/// a cold capture stream can take a second to deliver its first callback.
const STALL_LIMIT: Duration = Duration::from_secs(2);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// An open stream and the state to reopen it.
pub(super) struct Reopener {
    pub(super) selector: DeviceSelector,
    pub(super) device: String,
    pub(super) failure: Arc<Failure>,
    /// Set while the stream is down: when it went down, attempts so far, when to try next.
    pub(super) down: Option<(Instant, u32, Instant)>,
}

impl Reopener {
    /// Watches a new stream (after a reopen).
    pub(super) fn attach(&mut self, failure: &Arc<Failure>) {
        self.failure = Arc::clone(failure);
    }

    /// Checks the stream's health; returns the loss event the first time it fails.
    pub(super) fn check(&mut self, counters: &StreamCounters) -> Option<DeviceEvent> {
        if self.down.is_some() {
            return None;
        }
        let reason = self.failure.get().or_else(|| {
            let stats = counters.snapshot();
            (stats.callbacks > 0 && counters.since_last_callback() > STALL_LIMIT)
                .then(|| format!("no audio callback for {STALL_LIMIT:?}"))
        })?;
        let now = Instant::now();
        self.down = Some((now, 0, now + FIRST_RETRY));
        Some(DeviceEvent::Lost {
            device: self.device.clone(),
            reason,
        })
    }

    /// When the stream is down and a retry is due, runs `open`; returns the event to report.
    pub(super) fn retry<S>(
        &mut self,
        open: impl FnOnce(&DeviceSelector) -> Result<S, AudioError>,
    ) -> Option<(DeviceEvent, Option<S>)> {
        let (since, attempts, next) = self.down?;
        let now = Instant::now();
        if now < next {
            return None;
        }
        let attempts = attempts + 1;
        match open(&self.selector) {
            Ok(stream) => {
                self.down = None;
                Some((
                    DeviceEvent::Reopened {
                        device: self.device.clone(),
                        format: StreamFormat::new(0, 0),
                        attempts,
                        after: now - since,
                    },
                    Some(stream),
                ))
            }
            Err(e) => {
                let retry_in = (FIRST_RETRY * 2u32.saturating_pow(attempts)).min(MAX_RETRY);
                self.down = Some((since, attempts, now + retry_in));
                Some((
                    DeviceEvent::ReopenFailed {
                        device: self.device.clone(),
                        attempt: attempts,
                        error: e.to_string(),
                        retry_in,
                    },
                    None,
                ))
            }
        }
    }

    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.down.map(|(_, _, next)| next)
    }
}
