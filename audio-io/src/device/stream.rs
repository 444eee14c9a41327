//! Opening a cpal stream: the device's default format with a short period, a ring of samples
//! for the data callback, and an error callback that records fatal errors without allocating;
//! and retiring a failed stream without blocking.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use cpal::traits::{DeviceTrait, StreamTrait};
use cpal::{FromSample, SampleFormat, SizedSample, StreamConfig, SupportedBufferSize};
use ringbuf::traits::Split;
use ringbuf::{HeapCons, HeapProd, HeapRb};

use super::selection::{default_config, find_device, DeviceSelector, Direction};
use crate::callbacks::{CaptureCallback, PlaybackCallback, StreamCounters};
use crate::{AudioError, StreamFormat, StreamStats};

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
pub(super) struct Failure {
    pub(super) kind: AtomicU8,
    pub(super) device_xruns: AtomicU64,
    pub(super) device_errors: AtomicU64,
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

    pub(super) fn get(&self) -> Option<String> {
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

/// The data callback of a stream: capture fills a ring, playback drains one.
pub(super) enum Callback {
    Capture(CaptureCallback),
    Playback(PlaybackCallback),
}

/// Builds the stream of `callback`'s direction in `sample_format`.
fn build(
    device: &cpal::Device,
    config: &StreamConfig,
    sample_format: SampleFormat,
    callback: Callback,
    failure: Arc<Failure>,
) -> Result<cpal::Stream, cpal::Error> {
    match callback {
        Callback::Capture(c) => {
            with_sample_type!(sample_format, build_input(device, config, c, failure))
        }
        Callback::Playback(p) => {
            with_sample_type!(sample_format, build_output(device, config, p, failure))
        }
    }
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

/// Drops a failed stream on a thread of its own. Dropping joins cpal's worker thread, and a
/// worker can be stuck for good inside a driver whose server died (seen with the ALSA `pulse`
/// plugin when PulseAudio is killed); that must not hang the caller, so at worst a thread stays
/// stuck. (If no thread can be made, the stream is dropped here after all.)
pub(super) fn retire(stream: cpal::Stream) {
    let _ = std::thread::Builder::new()
        .name("lfm2d-stream-reaper".into())
        .spawn(move || drop(stream));
}

/// A started stream on the selected device in its default format, with the ring end the
/// program keeps (`R`) and what the error callback writes.
pub(super) struct Started<R> {
    pub(super) stream: cpal::Stream,
    pub(super) ring: R,
    pub(super) failure: Arc<Failure>,
    pub(super) format: StreamFormat,
    pub(super) name: String,
}

impl<R> Started<R> {
    /// The stream's counters (its data callback's `counters`) with what its error callback saw.
    pub(super) fn stats(&self, counters: &StreamCounters) -> StreamStats {
        StreamStats {
            device_xruns: self.failure.device_xruns.load(Relaxed),
            device_errors: self.failure.device_errors.load(Relaxed),
            ..counters.snapshot()
        }
    }
}

/// Opens and starts a stream: finds the device, takes its default format, makes a ring of
/// `ring_seconds` and hands both its ends and the channel count to `split`, which makes the
/// data callback of one end and returns it with the end the program keeps; asks for a
/// [`DEVICE_PERIOD`] period first and the device's default buffer if that is refused (a fresh
/// ring and callback for each try).
pub(super) fn start_stream<R>(
    direction: Direction,
    selector: &DeviceSelector,
    ring_seconds: usize,
    split: impl Fn(HeapProd<f32>, HeapCons<f32>, u16) -> (Callback, R),
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
        let (prod, cons) = HeapRb::<f32>::new(capacity).split();
        let (callback, ring) = split(prod, cons, format.channels);
        build(
            &device,
            config,
            sample_format,
            callback,
            Arc::clone(&failure),
        )
        .map(|stream| (stream, ring))
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
