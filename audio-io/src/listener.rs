//! The capture pump: one thread that reads a [`Capture`], downmixes, resamples to 16 kHz, runs
//! the echo canceller (optional), the VAD and endpointer, and sends [`ListenEvent`]s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use lfm2_audio::format::INPUT_SAMPLE_RATE;

use crate::echo::{EchoCanceller, EchoMode};
use crate::vad::{Endpointer, SileroVad, VadConfig, VadEvent, WINDOW};
use crate::{
    downmix_into, frames_to_duration, AudioError, Capture, DeviceEvent, ReadOutcome, StreamFormat,
    StreamResampler, StreamStats,
};

/// What the listener reports.
#[derive(Debug, Clone, PartialEq)]
pub enum ListenEvent {
    /// The pump runs; `format` is the source's own.
    Started {
        source: String,
        format: StreamFormat,
    },
    /// One VAD window (32 ms): its level and speech probability. Only with
    /// [`ListenerConfig::levels`].
    Level {
        at: Duration,
        rms_dbfs: f32,
        peak_dbfs: f32,
        speech_prob: f32,
        in_speech: bool,
    },
    /// An utterance boundary. `decided` is the audio time of the last sample the decision
    /// needed (the end of the window that completed `min_speech` or `min_silence`); `latency`
    /// is from that sample's capture (estimated from when samples reached the pump) to this
    /// event being sent: resampling, VAD and queueing, not the hold times themselves.
    Vad {
        event: VadEvent,
        decided: Duration,
        latency: Duration,
    },
    /// The capture device was lost or reopened.
    Device(DeviceEvent),
    /// The 16 kHz mono audio as it is processed. Only with [`ListenerConfig::tap_audio`].
    Audio { at: Duration, samples: Vec<f32> },
    /// The pump stopped: end of the source, `stop()`, or an error.
    Stopped {
        stats: StreamStats,
        error: Option<String>,
    },
}

/// Listener settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ListenerConfig {
    pub vad: VadConfig,
    /// Send a [`ListenEvent::Level`] per VAD window.
    pub levels: bool,
    /// Send the processed 16 kHz audio as [`ListenEvent::Audio`].
    pub tap_audio: bool,
}

/// A running capture pump. Dropping it stops the thread.
pub struct Listener {
    events: Receiver<ListenEvent>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Starts the pump thread on `capture` with a loaded `vad`.
    pub fn start(
        capture: Box<dyn Capture>,
        vad: SileroVad,
        config: ListenerConfig,
    ) -> Result<Self, AudioError> {
        Self::start_inner(capture, vad, config, None)
    }

    /// Starts the pump with echo handling: `echo` processes every 16 kHz window before the VAD
    /// (in [`EchoMode::Cancel`] the VAD, the audio tap and the utterances get its output; in
    /// [`EchoMode::HalfDuplex`] the microphone is muted while the assistant is audible). In
    /// `Cancel` and `Gate` mode a `SpeechStarted` while the assistant is audible is held back
    /// until the echo gate says it is the user ([`EchoCanceller::is_user_speech`]); it is then
    /// sent with `decided`/`latency` of the moment it was let through. The VAD hears speech in
    /// the echo too, so the held utterance may have begun long before the user spoke: its start
    /// is moved to a window before the first window the gate took for the user (with the usual
    /// pre-roll before that), and that is the `at` sent. An utterance that ends while still
    /// held was the assistant's own voice: neither of its events is sent (it is counted in
    /// [`crate::echo::EchoStats`]). So with echo handling on, every `SpeechStarted` the daemon
    /// receives is a barge-in candidate.
    ///
    /// Keep [`EchoCanceller::status`] before handing the canceller over to read its measurements.
    pub fn start_with_echo(
        capture: Box<dyn Capture>,
        vad: SileroVad,
        config: ListenerConfig,
        echo: EchoCanceller,
    ) -> Result<Self, AudioError> {
        Self::start_inner(capture, vad, config, Some(echo))
    }

    fn start_inner(
        capture: Box<dyn Capture>,
        vad: SileroVad,
        config: ListenerConfig,
        echo: Option<EchoCanceller>,
    ) -> Result<Self, AudioError> {
        config.vad.validate().map_err(AudioError::BadFormat)?;
        let (tx, events) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let pump = Pump::new(capture, vad, config, tx, Arc::clone(&stop), echo)?;
        let thread = std::thread::Builder::new()
            .name("lfm2d-capture".into())
            .spawn(move || pump.run())
            .map_err(|e| AudioError::Device {
                device: "capture pump".into(),
                message: e.to_string(),
            })?;
        Ok(Self {
            events,
            stop,
            thread: Some(thread),
        })
    }

    /// The event stream. It ends (disconnects) after [`ListenEvent::Stopped`].
    pub fn events(&self) -> &Receiver<ListenEvent> {
        &self.events
    }

    /// Asks the pump to stop without waiting; [`ListenEvent::Stopped`] follows on the channel.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the pump and waits for it; the last event is `Stopped`.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Pump {
    capture: Box<dyn Capture>,
    vad: SileroVad,
    endpointer: Endpointer,
    config: ListenerConfig,
    tx: Sender<ListenEvent>,
    stop: Arc<AtomicBool>,
    format: StreamFormat,
    resampler: StreamResampler,
    /// 16 kHz samples not yet making a full window.
    pending: Vec<f32>,
    mono: Vec<f32>,
    /// Source frames read since the (re)start of the stream.
    frames_read: u64,
    /// Audio time (16 kHz) at the (re)start of the stream.
    audio_base: Duration,
    /// Estimated wall-clock instant of audio time `audio_base`: the earliest moment consistent
    /// with every read so far (a sample cannot be read before it was captured).
    epoch: Option<Instant>,
    /// Echo handling, and its output for the current window.
    echo: Option<EchoCanceller>,
    echo_out: Vec<f32>,
    /// A `SpeechStarted` held back until the echo gate says it is the user.
    held: Option<VadEvent>,
    /// Windows in a row of digital silence (see [`QUIET`]).
    quiet_windows: u32,
}

/// Samples under this (-80 dBFS) are digital silence: a window of nothing else is not given to
/// the VAD model (a real microphone's noise floor is well above it).
const QUIET: f32 = 1e-4;
/// After this many windows of digital silence (0.32 s) the VAD's state starts afresh.
const QUIET_RESET: u32 = 10;

impl Pump {
    fn new(
        capture: Box<dyn Capture>,
        vad: SileroVad,
        config: ListenerConfig,
        tx: Sender<ListenEvent>,
        stop: Arc<AtomicBool>,
        echo: Option<EchoCanceller>,
    ) -> Result<Self, AudioError> {
        let format = capture.format().validate()?;
        Ok(Self {
            resampler: StreamResampler::new(format.sample_rate, INPUT_SAMPLE_RATE)?,
            endpointer: Endpointer::new(config.vad.clone()),
            capture,
            vad,
            config,
            tx,
            stop,
            format,
            pending: Vec::with_capacity(4 * WINDOW),
            mono: Vec::new(),
            frames_read: 0,
            audio_base: Duration::ZERO,
            epoch: None,
            echo,
            echo_out: Vec::with_capacity(WINDOW),
            held: None,
            quiet_windows: 0,
        })
    }

    fn send(&self, event: ListenEvent) {
        // The receiver may be gone (the owner stopped listening); nothing to do then.
        let _ = self.tx.send(event);
    }

    fn run(mut self) {
        self.send(ListenEvent::Started {
            source: self.capture.name(),
            format: self.format,
        });
        let error = self.pump().err().map(|e| e.to_string());
        let stats = self.capture.stats();
        self.send(ListenEvent::Stopped { stats, error });
    }

    fn pump(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        // About 20 ms of source audio per read.
        let mut buf = vec![0.0f32; self.read_len()];
        while !self.stop.load(Ordering::Relaxed) {
            match self.capture.read(&mut buf, Duration::from_millis(50))? {
                ReadOutcome::Samples(0) => {}
                ReadOutcome::Samples(n) => {
                    let read_at = Instant::now();
                    self.frames_read += (n / usize::from(self.format.channels)) as u64;
                    let read_end = frames_to_duration(self.frames_read, self.format.sample_rate);
                    let epoch = read_at.checked_sub(read_end).unwrap_or(read_at);
                    self.epoch = Some(self.epoch.map_or(epoch, |e| e.min(epoch)));
                    self.mono.clear();
                    downmix_into(&buf[..n], self.format.channels, &mut self.mono);
                    self.resampler.process(&self.mono, &mut self.pending);
                    self.process_windows()?;
                }
                ReadOutcome::Device(event) => {
                    let reopened = matches!(event, DeviceEvent::Reopened { .. });
                    self.send(ListenEvent::Device(event));
                    if reopened {
                        self.restart_stream()?;
                        buf = vec![0.0f32; self.read_len()];
                    }
                }
                ReadOutcome::End => {
                    self.resampler.flush(&mut self.pending);
                    self.process_windows()?;
                    break;
                }
            }
        }
        if let Some(event) = self.endpointer.finish() {
            let decided = self.endpointer.now();
            self.vad_event(event, decided, Duration::ZERO);
        }
        Ok(())
    }

    fn read_len(&self) -> usize {
        (self.format.sample_rate as usize / 50).max(1) * usize::from(self.format.channels)
    }

    /// After a reopen: the new stream may have another format, and its clock starts afresh.
    fn restart_stream(&mut self) -> Result<(), AudioError> {
        self.resampler.flush(&mut self.pending);
        self.format = self.capture.format().validate()?;
        self.resampler = StreamResampler::new(self.format.sample_rate, INPUT_SAMPLE_RATE)?;
        self.audio_base = self.endpointer.now()
            + frames_to_duration(self.pending.len() as u64, INPUT_SAMPLE_RATE);
        self.frames_read = 0;
        self.epoch = None;
        if let Some(echo) = self.echo.as_mut() {
            echo.restart_stream();
        }
        Ok(())
    }

    fn process_windows(&mut self) -> Result<(), crate::vad::VadError> {
        let mut used = 0;
        while self.pending.len() - used >= WINDOW {
            let raw = &self.pending[used..used + WINDOW];
            used += WINDOW;
            let at = self.endpointer.now();
            let window = match self.echo.as_mut() {
                Some(echo) => {
                    self.echo_out.clear();
                    echo.process(raw, &mut self.echo_out);
                    // A window is four whole canceller blocks, so all of it comes back.
                    if self.echo_out.len() == WINDOW {
                        &self.echo_out[..]
                    } else {
                        raw
                    }
                }
                None => raw,
            };
            // Digital silence (a muted microphone, a virtual device with nothing playing) holds
            // no speech: the model is not run on it, and starts afresh after it, as on a new
            // stream. Listening to such a microphone then costs almost nothing.
            let prob = if window.iter().all(|s| s.abs() < QUIET) {
                self.quiet_windows += 1;
                0.0
            } else {
                if self.quiet_windows >= QUIET_RESET {
                    self.vad.reset();
                }
                self.quiet_windows = 0;
                self.vad.probability(window)?
            };
            if let Some(echo) = self.echo.as_mut() {
                echo.judge(prob >= self.config.vad.threshold);
            }
            if self.config.tap_audio {
                self.send(ListenEvent::Audio {
                    at,
                    samples: window.to_vec(),
                });
            }
            if self.config.levels {
                let (rms_dbfs, peak_dbfs) = levels(window);
                let in_speech = self.endpointer.in_speech();
                self.send(ListenEvent::Level {
                    at,
                    rms_dbfs,
                    peak_dbfs,
                    speech_prob: prob,
                    in_speech,
                });
            }
            if let Some(event) = self.endpointer.push(window, prob) {
                let decided = self.endpointer.now();
                let latency = self.latency_since(decided);
                self.vad_event(event, decided, latency);
            }
            self.release_held();
        }
        self.pending.drain(..used);
        Ok(())
    }

    /// Sends a VAD event, or holds it back while it may be the assistant's own echo.
    fn vad_event(&mut self, event: VadEvent, decided: Duration, latency: Duration) {
        if let Some(echo) = &self.echo {
            let gated = matches!(echo.mode(), EchoMode::Cancel | EchoMode::Gate);
            match event {
                VadEvent::SpeechStarted { .. } if gated && !echo.is_user_speech() => {
                    self.held = Some(event);
                    return;
                }
                // Pauses of an utterance held back as echo are not news.
                VadEvent::SpeechPaused { .. } | VadEvent::SpeechResumed { .. }
                    if self.held.is_some() =>
                {
                    return;
                }
                VadEvent::SpeechEnded { .. } if self.held.is_some() => {
                    // It ended without the gate ever taking it for the user: echo.
                    self.held = None;
                    echo.count_suppressed();
                    return;
                }
                _ => {}
            }
        }
        self.send(ListenEvent::Vad {
            event,
            decided,
            latency,
        });
    }

    /// Lets a held `SpeechStarted` through once the gate says the user is speaking.
    fn release_held(&mut self) {
        if self.held.is_none() || !self.echo.as_ref().is_some_and(|e| e.is_user_speech()) {
            return;
        }
        if let Some(event) = self.held.take() {
            let decided = self.endpointer.now();
            let latency = self.latency_since(decided);
            // The held utterance may have begun as echo long before the user spoke (the VAD
            // hears the canceller's residual as speech): it now begins a window before the
            // first window the gate took for the user, and keeps only that much pre-roll.
            let onset = self
                .echo
                .as_ref()
                .and_then(|e| e.user_speech_onset())
                .unwrap_or(0);
            let user_start = decided.saturating_sub(crate::frames_to_duration(
                ((onset + 2) * WINDOW) as u64,
                INPUT_SAMPLE_RATE,
            ));
            let event = match event {
                VadEvent::SpeechStarted { at } if at < user_start => VadEvent::SpeechStarted {
                    at: self.endpointer.restart_at(user_start).unwrap_or(at),
                },
                other => other,
            };
            self.send(ListenEvent::Vad {
                event,
                decided,
                latency,
            });
        }
    }

    /// Time from the estimated capture of audio time `t` to now.
    fn latency_since(&self, t: Duration) -> Duration {
        match self.epoch {
            Some(epoch) => {
                let captured = epoch + t.saturating_sub(self.audio_base);
                Instant::now().saturating_duration_since(captured)
            }
            None => Duration::ZERO,
        }
    }
}

/// RMS and peak of a window in dB relative to full scale (floored at -120 dB).
fn levels(window: &[f32]) -> (f32, f32) {
    let energy = window.iter().map(|s| s * s).sum::<f32>() / window.len().max(1) as f32;
    let peak = window.iter().fold(0.0f32, |m, s| m.max(s.abs()));
    let db = |v: f32| (20.0 * v.max(1e-6).log10()).max(-120.0);
    (db(energy.sqrt()), db(peak))
}
