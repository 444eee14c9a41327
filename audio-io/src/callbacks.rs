//! The bodies of the real-time audio callbacks and the counters they update.
//!
//! These run on the audio driver's thread. They only copy samples between the device buffer and
//! an SPSC ring (`ringbuf`), convert the sample format, and update atomics. No allocation, no
//! locks, no logging, no system calls (`Instant::now` reads the vDSO clock on Linux, without
//! entering the kernel). `tests/realtime.rs` runs them under an allocation-counting allocator.
//!
//! Both sides move whole frames only, so a short ring never leaves a channel shifted.

use std::sync::atomic::{
    AtomicU64, AtomicU8,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpal::{FromSample, Sample};
use ringbuf::traits::{Consumer, Observer, Producer};
use ringbuf::{HeapCons, HeapProd};

/// Counters shared between one stream's callback and the rest of the program.
#[derive(Debug)]
pub struct StreamCounters {
    epoch: Instant,
    callbacks: AtomicU64,
    /// Frames that went through the ring (captured into it, or played from it).
    frames: AtomicU64,
    /// Callbacks that could not move all their frames: ring full on capture (overflow), ring
    /// short while audio was expected on playback (underrun).
    xruns: AtomicU64,
    /// Frames lost to overflows, or filled with silence by underruns.
    xrun_frames: AtomicU64,
    busy_ns_total: AtomicU64,
    busy_ns_max: AtomicU64,
    /// Frames the device asked for or delivered in the last callback (its period).
    last_period_frames: AtomicU64,
    /// Nanoseconds since `epoch` at the end of the last callback.
    last_callback_ns: AtomicU64,
}

impl Default for StreamCounters {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            callbacks: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            xruns: AtomicU64::new(0),
            xrun_frames: AtomicU64::new(0),
            busy_ns_total: AtomicU64::new(0),
            busy_ns_max: AtomicU64::new(0),
            last_period_frames: AtomicU64::new(0),
            last_callback_ns: AtomicU64::new(0),
        }
    }
}

impl StreamCounters {
    fn record(&self, started: Instant, frames: u64, period_frames: u64, short_frames: u64) {
        let now = Instant::now();
        let busy = now.saturating_duration_since(started).as_nanos() as u64;
        self.callbacks.fetch_add(1, Relaxed);
        self.frames.fetch_add(frames, Relaxed);
        if short_frames > 0 {
            self.xruns.fetch_add(1, Relaxed);
            self.xrun_frames.fetch_add(short_frames, Relaxed);
        }
        self.busy_ns_total.fetch_add(busy, Relaxed);
        self.busy_ns_max.fetch_max(busy, Relaxed);
        self.last_period_frames.store(period_frames, Relaxed);
        self.last_callback_ns.store(
            now.saturating_duration_since(self.epoch).as_nanos() as u64,
            Relaxed,
        );
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> StreamStats {
        let callbacks = self.callbacks.load(Relaxed);
        let busy_total = self.busy_ns_total.load(Relaxed);
        StreamStats {
            callbacks,
            frames: self.frames.load(Relaxed),
            xruns: self.xruns.load(Relaxed),
            xrun_frames: self.xrun_frames.load(Relaxed),
            device_xruns: 0,
            device_errors: 0,
            callback_mean: Duration::from_nanos(busy_total.checked_div(callbacks).unwrap_or(0)),
            callback_max: Duration::from_nanos(self.busy_ns_max.load(Relaxed)),
            period_frames: self.last_period_frames.load(Relaxed),
        }
    }

    /// Frames the device asked for or delivered in the last callback (0 before the first).
    pub fn period_frames(&self) -> u64 {
        self.last_period_frames.load(Relaxed)
    }

    /// Counts now as a callback for [`since_last_callback`](Self::since_last_callback) (a
    /// stream that was paused on purpose is not late).
    pub fn touch(&self) {
        self.last_callback_ns.store(
            Instant::now()
                .saturating_duration_since(self.epoch)
                .as_nanos() as u64,
            Relaxed,
        );
    }

    /// Time since the last callback ended (or since the counters were made, before the first).
    pub fn since_last_callback(&self) -> Duration {
        let last = Duration::from_nanos(self.last_callback_ns.load(Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// What a stream's callbacks did so far. For file and memory streams only `frames` is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub callbacks: u64,
    pub frames: u64,
    /// Overflows (capture) or underruns (playback).
    pub xruns: u64,
    pub xrun_frames: u64,
    /// Over/underruns the driver itself reported (audio lost or repeated below the ring).
    pub device_xruns: u64,
    /// Other errors the driver reported that the stream survived.
    pub device_errors: u64,
    /// Mean and longest time spent inside the data callback.
    pub callback_mean: Duration,
    pub callback_max: Duration,
    /// Frames per callback at the last callback: the device period.
    pub period_frames: u64,
}

impl StreamStats {
    /// Adds another stream's counts (a reopened device continues the same totals).
    pub fn merge(&mut self, other: &StreamStats) {
        let callbacks = self.callbacks + other.callbacks;
        if callbacks > 0 {
            let total = self.callback_mean.as_nanos() * u128::from(self.callbacks)
                + other.callback_mean.as_nanos() * u128::from(other.callbacks);
            self.callback_mean = Duration::from_nanos((total / u128::from(callbacks)) as u64);
        }
        self.callbacks = callbacks;
        self.frames += other.frames;
        self.xruns += other.xruns;
        self.xrun_frames += other.xrun_frames;
        self.device_xruns += other.device_xruns;
        self.device_errors += other.device_errors;
        self.callback_max = self.callback_max.max(other.callback_max);
        if other.period_frames > 0 {
            self.period_frames = other.period_frames;
        }
    }
}

/// The capture data callback: device samples in any format → `f32` in the ring.
pub struct CaptureCallback {
    ring: HeapProd<f32>,
    channels: usize,
    counters: Arc<StreamCounters>,
}

impl CaptureCallback {
    pub fn new(ring: HeapProd<f32>, channels: u16, counters: Arc<StreamCounters>) -> Self {
        Self {
            ring,
            channels: usize::from(channels.max(1)),
            counters,
        }
    }

    /// Copies the device buffer into the ring. Frames that do not fit are dropped and counted
    /// as an overflow; the callback never waits.
    pub fn process<T>(&mut self, data: &[T])
    where
        T: Sample,
        f32: FromSample<T>,
    {
        let started = Instant::now();
        let frames = data.len() / self.channels;
        let room = self.ring.vacant_len() / self.channels;
        let take = frames.min(room);
        let pushed = self.ring.push_iter(
            data[..take * self.channels]
                .iter()
                .map(|s| s.to_sample::<f32>()),
        );
        debug_assert_eq!(pushed, take * self.channels);
        self.counters
            .record(started, take as u64, frames as u64, (frames - take) as u64);
    }
}

/// What the playback ring holds, as far as underrun accounting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PlaybackState {
    /// Nothing queued and nothing expected: silence is not an underrun.
    Idle = 0,
    /// The writer is in the middle of a stream: running dry is an underrun.
    Playing = 1,
    /// The writer has sent the end of its stream: running dry means done.
    Draining = 2,
}

/// State the playback writer shares with its callback.
#[derive(Debug)]
pub struct PlaybackShared {
    pub counters: StreamCounters,
    state: AtomicU8,
    /// Bumped by the writer to ask the callback to drop everything queued (barge-in).
    clear_requests: AtomicU64,
    /// The last request the callback carried out: until it catches up, what the writer queues
    /// would be dropped with the rest.
    clears_done: AtomicU64,
}

impl Default for PlaybackShared {
    fn default() -> Self {
        Self {
            counters: StreamCounters::default(),
            state: AtomicU8::new(PlaybackState::Idle as u8),
            clear_requests: AtomicU64::new(0),
            clears_done: AtomicU64::new(0),
        }
    }
}

impl PlaybackShared {
    pub fn state(&self) -> PlaybackState {
        match self.state.load(Relaxed) {
            1 => PlaybackState::Playing,
            2 => PlaybackState::Draining,
            _ => PlaybackState::Idle,
        }
    }

    pub fn set_state(&self, state: PlaybackState) {
        self.state.store(state as u8, Relaxed);
    }

    /// Asks the callback to discard the queued audio at its next run.
    pub fn request_clear(&self) {
        self.clear_requests.fetch_add(1, Relaxed);
        self.set_state(PlaybackState::Idle);
    }

    /// Whether a clear was asked for that the callback has not carried out yet.
    pub fn clear_pending(&self) -> bool {
        self.clears_done.load(Acquire) != self.clear_requests.load(Relaxed)
    }
}

/// The playback data callback: `f32` from the ring → device samples in any format, silence when
/// the ring is short.
pub struct PlaybackCallback {
    ring: HeapCons<f32>,
    channels: usize,
    shared: Arc<PlaybackShared>,
    clears_seen: u64,
    /// The writer's stream has had a sample played: from then on, running short while it is
    /// playing is an underrun. (Before it, silence is the stream not having begun: the writer
    /// may mark a stream as playing a moment before its first samples are in the ring.)
    begun: bool,
}

impl PlaybackCallback {
    pub fn new(ring: HeapCons<f32>, channels: u16, shared: Arc<PlaybackShared>) -> Self {
        let clears_seen = shared.clear_requests.load(Relaxed);
        Self {
            ring,
            channels: usize::from(channels.max(1)),
            shared,
            clears_seen,
            begun: false,
        }
    }

    pub fn fill<T>(&mut self, out: &mut [T])
    where
        T: Sample + FromSample<f32>,
    {
        let started = Instant::now();
        let clears = self.shared.clear_requests.load(Relaxed);
        if clears != self.clears_seen {
            self.clears_seen = clears;
            let queued = self.ring.occupied_len();
            self.ring.skip(queued);
            self.shared.clears_done.store(clears, Release);
        }
        let frames = out.len() / self.channels;
        let available = self.ring.occupied_len() / self.channels;
        let take = frames.min(available);
        let (played, silent) = out.split_at_mut(take * self.channels);
        for (dst, src) in played.iter_mut().zip(self.ring.pop_iter()) {
            *dst = T::from_sample(src);
        }
        silent.fill(T::EQUILIBRIUM);

        let short = frames - take;
        let underrun = match self.shared.state() {
            PlaybackState::Playing => {
                self.begun |= take > 0;
                if self.begun {
                    short as u64
                } else {
                    0
                }
            }
            PlaybackState::Draining => {
                if short > 0 {
                    // Only Draining → Idle: a writer that started a new stream meanwhile wins.
                    let _ = self.shared.state.compare_exchange(
                        PlaybackState::Draining as u8,
                        PlaybackState::Idle as u8,
                        Relaxed,
                        Relaxed,
                    );
                    self.begun = false;
                }
                0
            }
            PlaybackState::Idle => {
                self.begun = false;
                0
            }
        };
        self.shared
            .counters
            .record(started, take as u64, frames as u64, underrun);
    }
}
