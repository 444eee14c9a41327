//! The audio callbacks must not allocate (nor free): an allocation can take a lock inside the
//! allocator and stall the audio thread. This binary installs a global allocator that counts
//! allocations and deallocations made on the current thread while a flag is set, and runs the
//! real callback bodies (the same `CaptureCallback::process` / `PlaybackCallback::fill` the cpal
//! streams call) through every path: normal, ring full (overflow), ring empty (underrun), clear
//! request, draining, and every sample format.
//!
//! It also prints the time spent per callback (a measurement, not an assertion).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use audio_io::callbacks::{
    CaptureCallback, PlaybackCallback, PlaybackShared, PlaybackState, StreamCounters,
};
use cpal::{FromSample, Sample};
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::HeapRb;

struct CountingAllocator;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static EVENTS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the thread-local may be gone while a thread shuts down.
    let _ = COUNTING.try_with(|counting| {
        if counting.get() {
            let _ = EVENTS.try_with(|e| e.set(e.get() + 1));
        }
    });
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note();
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` and returns how many allocator calls it made on this thread.
fn allocations_in(f: impl FnOnce()) -> u64 {
    EVENTS.with(|e| e.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    EVENTS.with(|e| e.get())
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the guard: a test that cannot fail proves nothing.
    let n = allocations_in(|| {
        let v: Vec<u8> = Vec::with_capacity(std::hint::black_box(64));
        std::hint::black_box(&v);
    });
    assert!(n >= 2, "allocation and free not counted: {n}");
}

fn capture_path<T>(device_buffer: &[T])
where
    T: Sample + Send + 'static,
    f32: FromSample<T>,
{
    let channels = 2u16;
    // A ring of 3 device buffers: the fourth callback overflows.
    let (prod, mut cons) = HeapRb::<f32>::new(device_buffer.len() * 3).split();
    let counters = Arc::new(StreamCounters::default());
    let mut callback = CaptureCallback::new(prod, channels, Arc::clone(&counters));
    let n = allocations_in(|| {
        for _ in 0..5 {
            callback.process(device_buffer);
        }
    });
    assert_eq!(
        n,
        0,
        "capture callback ({}) allocated",
        std::any::type_name::<T>()
    );
    let stats = counters.snapshot();
    assert_eq!(stats.callbacks, 5);
    assert_eq!(stats.xruns, 2, "two callbacks found the ring full");
    assert_eq!(stats.frames, (device_buffer.len() / 2 * 3) as u64);
    assert_eq!(cons.occupied_len(), device_buffer.len() * 3);
    // The samples arrive converted to f32, in order.
    let first: f32 = device_buffer[0].to_sample();
    assert_eq!(cons.try_pop(), Some(first));
}

#[test]
fn capture_callback_does_not_allocate_for_any_sample_format() {
    let frames = 480;
    capture_path(&vec![0.25f32; frames * 2]);
    capture_path(&vec![0.25f64; frames * 2]);
    capture_path(&vec![1234i16; frames * 2]);
    capture_path(&vec![-5i8; frames * 2]);
    capture_path(&vec![123_456i32; frames * 2]);
    capture_path(&vec![40_000u16; frames * 2]);
    capture_path(&vec![200u8; frames * 2]);
    capture_path(&vec![cpal::I24::new(1000).unwrap(); frames * 2]);
}

fn playback_path<T>()
where
    T: Sample + FromSample<f32> + Send + 'static,
{
    let channels = 2u16;
    let period = 480 * 2;
    let (mut prod, cons) = HeapRb::<f32>::new(period * 4).split();
    let shared = Arc::new(PlaybackShared::default());
    let mut callback = PlaybackCallback::new(cons, channels, Arc::clone(&shared));
    let mut out = vec![T::EQUILIBRIUM; period];
    let source: Vec<f32> = (0..period * 3).map(|i| (i % 100) as f32 / 200.0).collect();

    let n = allocations_in(|| {
        // Idle, empty ring: silence, no underrun.
        callback.fill(&mut out);
        // Playing: three full periods, then one short (an underrun).
        shared.set_state(PlaybackState::Playing);
        prod.push_slice(&source);
        for _ in 0..4 {
            callback.fill(&mut out);
        }
        // A clear request drops what is queued.
        prod.push_slice(&source[..period]);
        shared.request_clear();
        callback.fill(&mut out);
        // Draining: the tail plays, then the stream is done and silence is not an underrun.
        shared.set_state(PlaybackState::Playing);
        prod.push_slice(&source[..period / 2]);
        shared.set_state(PlaybackState::Draining);
        callback.fill(&mut out);
        callback.fill(&mut out);
    });
    assert_eq!(
        n,
        0,
        "playback callback ({}) allocated",
        std::any::type_name::<T>()
    );
    let stats = shared.counters.snapshot();
    assert_eq!(stats.callbacks, 8);
    assert_eq!(
        stats.xruns, 1,
        "only the short period while playing is an underrun"
    );
    assert_eq!(
        stats.frames,
        (3 * period / 2 + period / 4) as u64,
        "played frames"
    );
    assert_eq!(shared.state(), PlaybackState::Idle);
}

#[test]
fn playback_callback_does_not_allocate_for_any_sample_format() {
    playback_path::<f32>();
    playback_path::<f64>();
    playback_path::<i16>();
    playback_path::<i32>();
    playback_path::<u16>();
    playback_path::<u8>();
    playback_path::<cpal::I24>();
}

/// A stream marked as playing before its first samples reach the ring (the writer and the
/// callback run on different threads) has not begun: the silence until then is no underrun.
/// Once a sample of it has played, running short is one; a new stream begins afresh.
#[test]
fn silence_before_a_streams_first_sample_is_no_underrun() {
    let period = 480 * 2;
    let (mut prod, cons) = HeapRb::<f32>::new(period * 4).split();
    let shared = Arc::new(PlaybackShared::default());
    let mut callback = PlaybackCallback::new(cons, 2, Arc::clone(&shared));
    let mut out = vec![0.0f32; period];
    let source = vec![0.25f32; period];

    shared.set_state(PlaybackState::Playing);
    callback.fill(&mut out);
    callback.fill(&mut out);
    assert_eq!(shared.counters.snapshot().xruns, 0, "not begun yet");

    prod.push_slice(&source);
    callback.fill(&mut out);
    assert!(out.iter().all(|&s| s == 0.25));
    callback.fill(&mut out);
    let stats = shared.counters.snapshot();
    assert_eq!(stats.xruns, 1, "begun, then short: an underrun");
    assert_eq!(stats.xrun_frames, 480);

    // A period that starts the stream and runs short is a hole too.
    shared.set_state(PlaybackState::Idle);
    callback.fill(&mut out);
    shared.set_state(PlaybackState::Playing);
    callback.fill(&mut out);
    assert_eq!(
        shared.counters.snapshot().xruns,
        1,
        "a new stream, not begun"
    );
    prod.push_slice(&source[..period / 2]);
    callback.fill(&mut out);
    let stats = shared.counters.snapshot();
    assert_eq!(stats.xruns, 2);
    assert_eq!(stats.xrun_frames, 480 + 240);

    // Drained to the end: the next stream has not begun either.
    shared.set_state(PlaybackState::Draining);
    callback.fill(&mut out);
    assert_eq!(shared.state(), PlaybackState::Idle);
    shared.set_state(PlaybackState::Playing);
    callback.fill(&mut out);
    assert_eq!(shared.counters.snapshot().xruns, 2);
}

#[test]
fn callback_timing() {
    // 10 ms stereo periods at 48 kHz, the size the device streams ask for.
    let period = 480 * 2;
    let (prod, mut cons) = HeapRb::<f32>::new(period * 8).split();
    let counters = Arc::new(StreamCounters::default());
    let mut capture = CaptureCallback::new(prod, 2, Arc::clone(&counters));
    let input = vec![1000i16; period];
    let mut sink = vec![0.0f32; period];
    let rounds = 20_000;
    let started = Instant::now();
    for _ in 0..rounds {
        capture.process(&input);
        cons.pop_slice(&mut sink);
    }
    let capture_mean = started.elapsed() / rounds;

    let (mut prod, cons) = HeapRb::<f32>::new(period * 8).split();
    let shared = Arc::new(PlaybackShared::default());
    shared.set_state(PlaybackState::Playing);
    let mut playback = PlaybackCallback::new(cons, 2, Arc::clone(&shared));
    let source = vec![0.1f32; period];
    let mut out = vec![0i16; period];
    let started = Instant::now();
    for _ in 0..rounds {
        prod.push_slice(&source);
        playback.fill(&mut out);
    }
    let playback_mean = started.elapsed() / rounds;
    let cap = counters.snapshot();
    let play = shared.counters.snapshot();
    println!(
        "callback timing, 480-frame stereo i16 periods (10 ms at 48 kHz), {rounds} rounds: \
         capture {capture_mean:?} per call (inside: mean {:?}, max {:?}), \
         playback {playback_mean:?} per call (inside: mean {:?}, max {:?})",
        cap.callback_mean, cap.callback_max, play.callback_mean, play.callback_max
    );
    assert_eq!(cap.xruns + play.xruns, 0);
}
