//! Sound cards through cpal: listing, choosing by name or index, capture and playback streams
//! that survive the device going away (reopened with backoff, the event reported).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{FromSample, SampleFormat, SizedSample, StreamConfig, SupportedBufferSize};
use crossbeam_channel::{Receiver, Sender};
use ringbuf::traits::{Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use crate::rt::{CaptureCallback, PlaybackCallback, PlaybackShared, PlaybackState, StreamCounters};
use crate::{
    AudioError, Capture, Playback, ReadOutcome, StreamFormat, StreamResampler, StreamStats,
};

/// Capture or playback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

impl Direction {
    fn word(self) -> &'static str {
        match self {
            Direction::Input => "input",
            Direction::Output => "output",
        }
    }
}

/// Which device to open: the system default, the n-th in [`list_devices`] order, or by name
/// (exact, else a unique case-insensitive substring).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSelector {
    #[default]
    Default,
    Index(usize),
    Name(String),
}

impl FromStr for DeviceSelector {
    type Err = std::convert::Infallible;

    /// `""` or `"default"` is the default device, a number is an index, anything else a name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Ok(if s.is_empty() || s.eq_ignore_ascii_case("default") {
            DeviceSelector::Default
        } else if let Ok(i) = s.parse::<usize>() {
            DeviceSelector::Index(i)
        } else {
            DeviceSelector::Name(s.to_string())
        })
    }
}

impl std::fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSelector::Default => f.write_str("default"),
            DeviceSelector::Index(i) => write!(f, "#{i}"),
            DeviceSelector::Name(n) => f.write_str(n),
        }
    }
}

/// One device as `lfm2d devices` shows it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Position in the listing for its direction; `--device N` picks it.
    pub index: usize,
    pub name: String,
    /// What the host says the device is.
    pub description: String,
    /// The host's stable identifier.
    pub id: String,
    pub is_default: bool,
    /// The format a stream opens with (the device's default), with its sample format.
    pub default_format: Option<(StreamFormat, String)>,
    /// Rate ranges and channel counts the device supports, for display.
    pub supported: Vec<String>,
}

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

/// The short name of a device: its host id without the host prefix (`alsa:pulse` → `pulse`),
/// which is what ALSA and PulseAudio tools call it too.
fn device_name(device: &cpal::Device) -> String {
    let id = device_id(device);
    match id.split_once(':') {
        Some((_, name)) if !name.is_empty() => name.to_string(),
        _ => device_description(device),
    }
}

/// The host's human-readable description of a device.
fn device_description(device: &cpal::Device) -> String {
    device
        .description()
        .map(|d| d.name().to_string())
        .unwrap_or_else(|_| device.to_string())
}

fn device_id(device: &cpal::Device) -> String {
    device.id().map(|id| id.to_string()).unwrap_or_default()
}

fn default_config(
    device: &cpal::Device,
    direction: Direction,
) -> Result<cpal::SupportedStreamConfig, cpal::Error> {
    match direction {
        Direction::Input => device.default_input_config(),
        Direction::Output => device.default_output_config(),
    }
}

fn host_devices(direction: Direction) -> Result<(cpal::Host, Vec<cpal::Device>), AudioError> {
    let host = cpal::default_host();
    let devices = match direction {
        Direction::Input => host.input_devices().map(|d| d.collect()),
        Direction::Output => host.output_devices().map(|d| d.collect()),
    }
    .map_err(|e| AudioError::Device {
        device: host.id().name().to_string(),
        message: e.to_string(),
    })?;
    Ok((host, devices))
}

/// Lists the devices of one direction on the default host (ALSA on Linux).
pub fn list_devices(direction: Direction) -> Result<Vec<DeviceInfo>, AudioError> {
    let (host, devices) = host_devices(direction)?;
    let default_id = match direction {
        Direction::Input => host.default_input_device(),
        Direction::Output => host.default_output_device(),
    }
    .map(|d| device_id(&d));
    Ok(devices
        .iter()
        .enumerate()
        .map(|(index, device)| {
            let id = device_id(device);
            let default_format = default_config(device, direction).ok().map(|c| {
                (
                    StreamFormat::new(c.sample_rate(), c.channels()),
                    c.sample_format().to_string(),
                )
            });
            let ranges: Vec<cpal::SupportedStreamConfigRange> = match direction {
                Direction::Input => device.supported_input_configs().map(|r| r.collect()),
                Direction::Output => device.supported_output_configs().map(|r| r.collect()),
            }
            .unwrap_or_default();
            let supported = summarize_ranges(&ranges);
            DeviceInfo {
                index,
                name: device_name(device),
                description: device_description(device),
                is_default: default_id.as_deref() == Some(id.as_str()),
                id,
                default_format,
                supported,
            }
        })
        .collect())
}

/// One line per sample format and rate range, with the channel counts collapsed
/// ("8000-192000 Hz, 1-32 ch, i16"): ALSA plugins list every channel count separately.
fn summarize_ranges(ranges: &[cpal::SupportedStreamConfigRange]) -> Vec<String> {
    let mut groups: Vec<(u32, u32, SampleFormat, u16, u16)> = Vec::new();
    for r in ranges {
        let key = (r.min_sample_rate(), r.max_sample_rate(), r.sample_format());
        match groups.iter_mut().find(|g| (g.0, g.1, g.2) == key) {
            Some(g) => {
                g.3 = g.3.min(r.channels());
                g.4 = g.4.max(r.channels());
            }
            None => groups.push((key.0, key.1, key.2, r.channels(), r.channels())),
        }
    }
    groups
        .into_iter()
        .map(|(lo, hi, format, ch_lo, ch_hi)| {
            let rates = if lo == hi {
                format!("{lo} Hz")
            } else {
                format!("{lo}-{hi} Hz")
            };
            let channels = if ch_lo == ch_hi {
                format!("{ch_lo} ch")
            } else {
                format!("{ch_lo}-{ch_hi} ch")
            };
            format!("{rates}, {channels}, {format}")
        })
        .collect()
}

fn no_device_hint() -> String {
    "; is a sound card connected, or a sound server (PulseAudio, PipeWire) running? \
     `lfm2d devices` lists what is available"
        .to_string()
}

/// Finds the device a selector names.
pub fn find_device(
    direction: Direction,
    selector: &DeviceSelector,
) -> Result<(cpal::Device, String), AudioError> {
    let (host, devices) = host_devices(direction)?;
    let word = direction.word();
    let available = || {
        if devices.is_empty() {
            "none".to_string()
        } else {
            devices
                .iter()
                .enumerate()
                .map(|(i, d)| format!("#{i} {:?}", device_name(d)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let found = match selector {
        DeviceSelector::Default => {
            let default = match direction {
                Direction::Input => host.default_input_device(),
                Direction::Output => host.default_output_device(),
            };
            return default
                .map(|d| {
                    let name = device_name(&d);
                    (d, name)
                })
                .ok_or_else(|| AudioError::NoDevice {
                    direction: word,
                    hint: no_device_hint(),
                });
        }
        DeviceSelector::Index(i) => devices.get(*i).cloned(),
        DeviceSelector::Name(wanted) => {
            let exact = devices
                .iter()
                .find(|d| device_name(d) == *wanted || device_id(d) == *wanted);
            match exact {
                Some(d) => Some(d.clone()),
                None => {
                    let lower = wanted.to_lowercase();
                    let mut matches = devices.iter().filter(|d| {
                        device_name(d).to_lowercase().contains(&lower)
                            || device_description(d).to_lowercase().contains(&lower)
                    });
                    match (matches.next(), matches.next()) {
                        (Some(d), None) => Some(d.clone()),
                        _ => None,
                    }
                }
            }
        }
    };
    if devices.is_empty() {
        return Err(AudioError::NoDevice {
            direction: word,
            hint: no_device_hint(),
        });
    }
    found
        .map(|d| {
            let name = device_name(&d);
            (d, name)
        })
        .ok_or_else(|| AudioError::DeviceNotFound {
            direction: word,
            wanted: selector.to_string(),
            available: available(),
        })
}

/// The error kinds after which a stream delivers no more audio (cpal's ALSA worker exits on
/// them), in a fixed order so the callback can store one as a number. Other errors are counted:
/// the stream goes on, and if it stops calling back, the stall check declares it lost. (Counting
/// a flood of errors as a loss was tried: a fresh stream after a sound-server restart reports
/// thousands of errors while playing correctly.)
const FATAL_KINDS: [cpal::ErrorKind; 3] = [
    cpal::ErrorKind::DeviceNotAvailable,
    cpal::ErrorKind::StreamInvalidated,
    cpal::ErrorKind::HostUnavailable,
];

/// Written by a stream's error callback: the first fatal error (the stream can no longer deliver
/// audio) and the over/underruns the driver reported. Atomic numbers rather than the errors
/// themselves: the callback must not allocate or lock.
#[derive(Debug, Default)]
struct Failure {
    kind: AtomicU8,
    device_xruns: AtomicU64,
    device_errors: AtomicU64,
}

impl Failure {
    fn set(&self, kind: cpal::ErrorKind) {
        let Some(code) = FATAL_KINDS.iter().position(|k| *k == kind) else {
            self.device_errors.fetch_add(1, Relaxed);
            return;
        };
        // Keep the first failure: later ones are usually its consequences.
        let _ = self
            .kind
            .compare_exchange(0, code as u8 + 1, Relaxed, Relaxed);
    }

    fn get(&self) -> Option<String> {
        let code = self.kind.load(Relaxed);
        (code != 0).then(|| FATAL_KINDS[usize::from(code - 1)].to_string())
    }
}

/// Builds the error callback: fatal kinds mark the stream failed; driver over/underruns and
/// other errors are counted; route changes the stream survives are ignored.
fn error_callback(failure: Arc<Failure>) -> impl FnMut(cpal::Error) + Send + 'static {
    move |err: cpal::Error| match err.kind() {
        cpal::ErrorKind::Xrun => {
            failure.device_xruns.fetch_add(1, Relaxed);
        }
        cpal::ErrorKind::DeviceChanged | cpal::ErrorKind::RealtimeDenied => {}
        kind => failure.set(kind),
    }
}

/// The device period asked for. Short enough for conversation (a callback every 20 ms), long
/// enough that the two-period buffer cpal's ALSA backend sets up (40 ms) survives a loaded
/// machine and a sound server in between.
pub const DEVICE_PERIOD: Duration = Duration::from_millis(20);

/// A stream config asking for a [`DEVICE_PERIOD`] period where the device allows it.
fn low_latency_config(supported: &cpal::SupportedStreamConfig) -> StreamConfig {
    let mut config = supported.config();
    let period =
        ((f64::from(supported.sample_rate()) * DEVICE_PERIOD.as_secs_f64()) as u32).max(32);
    if let SupportedBufferSize::Range { min, max } = supported.buffer_size() {
        config.buffer_size = cpal::BufferSize::Fixed(period.clamp(*min, (*max).max(*min)));
    }
    config
}

/// Calls `$build::<T>` with the Rust sample type matching a runtime `SampleFormat`.
macro_rules! with_sample_type {
    ($format:expr, $build:ident ( $($arg:expr),* )) => {
        match $format {
            SampleFormat::I8 => $build::<i8>($($arg),*),
            SampleFormat::I16 => $build::<i16>($($arg),*),
            SampleFormat::I24 => $build::<cpal::I24>($($arg),*),
            SampleFormat::I32 => $build::<i32>($($arg),*),
            SampleFormat::I64 => $build::<i64>($($arg),*),
            SampleFormat::U8 => $build::<u8>($($arg),*),
            SampleFormat::U16 => $build::<u16>($($arg),*),
            SampleFormat::U24 => $build::<cpal::U24>($($arg),*),
            SampleFormat::U32 => $build::<u32>($($arg),*),
            SampleFormat::U64 => $build::<u64>($($arg),*),
            SampleFormat::F32 => $build::<f32>($($arg),*),
            SampleFormat::F64 => $build::<f64>($($arg),*),
            other => Err(cpal::Error::with_message(
                cpal::ErrorKind::UnsupportedConfig,
                format!("sample format {other} is not supported"),
            )),
        }
    };
}

fn build_input<T>(
    device: &cpal::Device,
    config: &StreamConfig,
    mut callback: CaptureCallback,
    failure: Arc<Failure>,
) -> Result<cpal::Stream, cpal::Error>
where
    T: SizedSample,
    f32: FromSample<T>,
{
    device.build_input_stream::<T, _, _>(
        *config,
        move |data: &[T], _: &cpal::InputCallbackInfo| callback.process(data),
        error_callback(failure),
        None,
    )
}

fn build_output<T>(
    device: &cpal::Device,
    config: &StreamConfig,
    mut callback: PlaybackCallback,
    failure: Arc<Failure>,
) -> Result<cpal::Stream, cpal::Error>
where
    T: SizedSample + FromSample<f32>,
{
    device.build_output_stream::<T, _, _>(
        *config,
        move |data: &mut [T], _: &cpal::OutputCallbackInfo| callback.fill(data),
        error_callback(failure),
        None,
    )
}

/// How long a running stream may go without a callback before it counts as lost. Generous:
/// a cold capture stream can take a second to deliver its first callback.
const STALL_LIMIT: Duration = Duration::from_secs(2);
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// How long `DevicePlayback::write` keeps trying to reopen a vanished device before it returns
/// an error (capture keeps trying for as long as it is read).
const GIVE_UP: Duration = Duration::from_secs(10);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Seconds of audio each ring holds.
const CAPTURE_RING_SECONDS: usize = 2;
const PLAYBACK_RING_SECONDS: usize = 2;

/// An open stream and the state to reopen it.
struct Reopener {
    selector: DeviceSelector,
    device: String,
    failure: Arc<Failure>,
    /// Set while the stream is down: when it went down, attempts so far, when to try next.
    down: Option<(Instant, u32, Instant)>,
}

impl Reopener {
    /// Watches a new stream (after a reopen).
    fn attach(&mut self, failure: &Arc<Failure>) {
        self.failure = Arc::clone(failure);
    }

    /// Checks the stream's health; returns the loss event the first time it fails.
    fn check(&mut self, counters: &StreamCounters) -> Option<DeviceEvent> {
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
    fn retry<S>(
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

    fn next_retry(&self) -> Option<Instant> {
        self.down.map(|(_, _, next)| next)
    }
}

/// Drops a failed stream on a thread of its own. Dropping joins cpal's worker thread, and a
/// worker can be stuck for good inside a driver whose server died (seen with the ALSA `pulse`
/// plugin when PulseAudio is killed); that must not hang the caller, so at worst a thread stays
/// stuck. (If no thread can be made, the stream is dropped here after all.)
fn retire(stream: cpal::Stream) {
    let _ = std::thread::Builder::new()
        .name("lfm2d-stream-reaper".into())
        .spawn(move || drop(stream));
}

struct OpenCapture {
    stream: cpal::Stream,
    ring: HeapCons<f32>,
    counters: Arc<StreamCounters>,
    failure: Arc<Failure>,
    format: StreamFormat,
    name: String,
}

impl OpenCapture {
    fn snapshot(&self) -> StreamStats {
        StreamStats {
            device_xruns: self.failure.device_xruns.load(Relaxed),
            device_errors: self.failure.device_errors.load(Relaxed),
            ..self.counters.snapshot()
        }
    }
}

/// A started stream on the selected device in its default format, with the ring end the
/// program keeps (`R`) and what the error callback writes.
struct Started<R> {
    stream: cpal::Stream,
    ring: R,
    failure: Arc<Failure>,
    format: StreamFormat,
    name: String,
}

/// Opens and starts a stream: finds the device, takes its default format, makes a ring of
/// `ring_seconds` and builds the stream with `build` (given the device, config, sample format,
/// channel count, ring capacity and failure flags), asking for a [`DEVICE_PERIOD`] period first
/// and the device's default buffer if that is refused.
fn start_stream<R>(
    direction: Direction,
    selector: &DeviceSelector,
    ring_seconds: usize,
    build: impl Fn(
        &cpal::Device,
        &StreamConfig,
        SampleFormat,
        u16,
        usize,
        &Arc<Failure>,
    ) -> Result<(cpal::Stream, R), cpal::Error>,
) -> Result<Started<R>, AudioError> {
    let (device, name) = find_device(direction, selector)?;
    let err = |e: cpal::Error| AudioError::Device {
        device: name.clone(),
        message: e.to_string(),
    };
    let supported = default_config(&device, direction).map_err(err)?;
    let format = StreamFormat::new(supported.sample_rate(), supported.channels()).validate()?;
    let capacity = format.sample_rate as usize * usize::from(format.channels) * ring_seconds;
    let failure = Arc::new(Failure::default());
    let sample_format = supported.sample_format();
    let attempt = |config: &StreamConfig| {
        build(
            &device,
            config,
            sample_format,
            format.channels,
            capacity,
            &failure,
        )
    };
    let (stream, ring) = attempt(&low_latency_config(&supported))
        .or_else(|_| attempt(&supported.config()))
        .map_err(err)?;
    stream.play().map_err(err)?;
    Ok(Started {
        stream,
        ring,
        failure,
        format,
        name,
    })
}

fn open_capture(selector: &DeviceSelector) -> Result<OpenCapture, AudioError> {
    let counters = Arc::new(StreamCounters::default());
    let started = start_stream(
        Direction::Input,
        selector,
        CAPTURE_RING_SECONDS,
        |device, config, sample_format, channels, capacity, failure| {
            let (prod, cons): (HeapProd<f32>, HeapCons<f32>) = HeapRb::new(capacity).split();
            let callback = CaptureCallback::new(prod, channels, Arc::clone(&counters));
            let stream = with_sample_type!(
                sample_format,
                build_input(device, config, callback, Arc::clone(failure))
            )?;
            Ok((stream, cons))
        },
    )?;
    Ok(OpenCapture {
        stream: started.stream,
        ring: started.ring,
        counters,
        failure: started.failure,
        format: started.format,
        name: started.name,
    })
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
            device: open.name.clone(),
            failure: Arc::clone(&open.failure),
            down: None,
        };
        Ok(Self {
            format: open.format,
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
            retire(open.stream);
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
                            *format = open.format;
                            *device = open.name.clone();
                        }
                        // A different rate or channel count is handled by the reader, which
                        // sees the new `format()` after this event.
                        self.format = open.format;
                        self.reopener.attach(&open.failure);
                        self.open = Some(open);
                    }
                    return Ok(ReadOutcome::Device(event));
                }
            }
            let channels = usize::from(self.format.channels);
            if let Some(open) = &mut self.open {
                use ringbuf::traits::Consumer;
                let whole =
                    (open.ring.occupied_len() / channels).min(buf.len() / channels) * channels;
                if whole > 0 {
                    let n = open.ring.pop_slice(&mut buf[..whole]);
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

struct OpenPlayback {
    /// Kept alive: dropping it stops the stream.
    _stream: cpal::Stream,
    ring: HeapProd<f32>,
    shared: Arc<PlaybackShared>,
    failure: Arc<Failure>,
    format: StreamFormat,
    name: String,
}

impl OpenPlayback {
    fn snapshot(&self) -> StreamStats {
        StreamStats {
            device_xruns: self.failure.device_xruns.load(Relaxed),
            device_errors: self.failure.device_errors.load(Relaxed),
            ..self.shared.counters.snapshot()
        }
    }
}

fn open_playback(selector: &DeviceSelector) -> Result<OpenPlayback, AudioError> {
    let shared = Arc::new(PlaybackShared::default());
    let started = start_stream(
        Direction::Output,
        selector,
        PLAYBACK_RING_SECONDS,
        |device, config, sample_format, channels, capacity, failure| {
            let (prod, cons): (HeapProd<f32>, HeapCons<f32>) = HeapRb::new(capacity).split();
            let callback = PlaybackCallback::new(cons, channels, Arc::clone(&shared));
            let stream = with_sample_type!(
                sample_format,
                build_output(device, config, callback, Arc::clone(failure))
            )?;
            Ok((stream, prod))
        },
    )?;
    Ok(OpenPlayback {
        _stream: started.stream,
        ring: started.ring,
        shared,
        failure: started.failure,
        format: started.format,
        name: started.name,
    })
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
        let resampler = StreamResampler::new(source_rate, open.format.sample_rate)?;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let reopener = Reopener {
            selector: selector.clone(),
            device: open.name.clone(),
            failure: Arc::clone(&open.failure),
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
            || open.ring.occupied_len() > 0
        {
            return false;
        }
        self.paused = open._stream.pause().is_ok();
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
            let _ = open._stream.play();
        }
    }

    /// The device's format (what the callback writes).
    pub fn device_format(&self) -> Option<StreamFormat> {
        self.open.as_ref().map(|o| o.format)
    }

    /// Device events (lost, reopened) as they happen.
    pub fn device_events(&self) -> Receiver<DeviceEvent> {
        self.events_rx.clone()
    }

    fn played_in(open: &OpenPlayback, source_rate: u32) -> u64 {
        let frames = open.shared.counters.snapshot().frames;
        (u128::from(frames) * u128::from(source_rate) / u128::from(open.format.sample_rate)) as u64
    }

    /// Drops the current stream (keeping its counts) after a failure.
    fn close(&mut self) {
        if let Some(open) = self.open.take() {
            self.played_before += Self::played_in(&open, self.source_rate);
            self.previous.merge(&open.snapshot());
            retire(open._stream);
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
                        *format = open.format;
                        *device = open.name.clone();
                    }
                    self.resampler =
                        StreamResampler::new(self.source_rate, open.format.sample_rate)?;
                    self.reopener.attach(&open.failure);
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
            let channels = usize::from(open.format.channels);
            let frames = (open.ring.vacant_len() / channels).min(self.resampled.len() - pos);
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
            let pushed = open.ring.push_slice(&self.interleaved);
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
        if let Some(open) = &self.open {
            open.shared.set_state(PlaybackState::Playing);
        }
        self.resampler.process(samples, &mut self.resampled);
        self.queue()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_parses_default_index_and_name() {
        assert_eq!(
            "".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Default
        );
        assert_eq!(
            "Default".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Default
        );
        assert_eq!(
            "3".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Index(3)
        );
        assert_eq!(
            "pulse".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Name("pulse".into())
        );
    }
}
