//! Echo handling: keeping the assistant from hearing (and interrupting) itself when its voice
//! comes back from the speaker into the microphone.
//!
//! Three layers, chosen with [`EchoMode`]:
//! 1. An acoustic echo canceller ([`EchoCanceller`]): the audio sent to the speaker is the
//!    reference; its echo in the 16 kHz microphone signal is modelled by an adaptive filter
//!    ([`AdaptiveFilter`], a two-path partitioned-block frequency-domain NLMS) and subtracted,
//!    before the VAD.
//! 2. A barge-in gate ([`EchoGate`]): while the assistant is audible, speech only counts as the
//!    user when the canceller could not explain it (it is much less attenuated than the echo).
//! 3. Half duplex: the microphone is muted while the assistant is audible.
//!
//! Timing. The reference must be lined up with its echo to within a fraction of a millisecond.
//! [`EchoReference`] places every played sample at the wall-clock time the playback consumed it
//! (from the playback's `played()` counter, good to a device period); the canceller knows when
//! each microphone sample was captured the same way (the earliest time consistent with every
//! call, as the listener does). What remains (device buffers on both sides, the air, and the
//! anchoring error) is the bulk delay, measured by cross-correlation ([`DelayEstimator`],
//! GCC-PHAT) over up to a second of echo: at the start, after every new stretch of playing (and
//! after a stall the reference noticed), every second of playing after that to follow drift,
//! and at once when the canceller's attenuation collapses. The adaptive filter starts
//! [`PRE_DELAY`] samples before the measured arrival and spans [`EchoConfig::filter_ms`]. When a
//! measurement moves the arrival, the learnt echo path is moved so that its strongest tap stays
//! at the arrival, rather than learnt again.
//!
//! Underruns. A playback that runs dry or a driver xrun delays everything played after it: the
//! echo moves under the filter, the output suddenly holds the whole echo, and an adaptive
//! filter left alone would unlearn the room to learn the shifted timing. The filter therefore
//! only learns on a measured alignment. When a converged canceller's attenuation collapses (two
//! windows under [`SUSPECT_ATTENUATION`]), or its gate says "user" while the assistant is
//! audible, adaptation pauses and the gate's verdict is withheld until the delay has been
//! measured on the microphone since then: unchanged, or no echo to be found, means the user is
//! talking; moved means the assistant's own voice arrived where the filter no longer expected
//! it, the verdict is refused (a "veto"), the learnt path is moved, and the gate waits until
//! the canceller has again shown [`GateConfig::min_erle_db`] of attenuation. While the filter
//! makes things worse than nothing, the microphone is passed on untouched.
//!
//! Wiring (see the crate README): the thread that writes the playback pushes every chunk to an
//! [`EchoReference`] with the playback's `played()` counter; the listener runs the canceller on
//! each 16 kHz window before the VAD ([`crate::Listener::start_with_echo`]) and holds back a
//! `SpeechStarted` during playback until the gate says it is the user.

mod delay;
mod filter;
mod gate;
mod reference;

use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use delay::{DelayEstimator, DelayPeak};
pub use filter::{AdaptiveFilter, BlockReport};
pub use gate::{EchoGate, GateConfig, GateWindow};
pub use reference::EchoReference;

use lfm2_audio::format::INPUT_SAMPLE_RATE;

/// Samples per adaptive-filter block at 16 kHz (8 ms). Feed the canceller multiples of this
/// (the VAD window, 512, is one) and it adds no latency.
pub const BLOCK: usize = 128;

/// Taps the filter keeps before the measured arrival of the echo (4 ms): room for the
/// estimate's error and for a loudspeaker whose response starts a little early.
pub const PRE_DELAY: usize = 64;

/// Playing time after which a canceller that has never found an echo takes the microphone to
/// be deaf to the speaker (1.5 s; a real echo path is measured well within it). Only time the
/// speaker really played counts: when a stall shows that what the reference said was audible
/// had not played yet (as when a device is slow to start), the stall's length is taken off
/// again. The rest of the time goes on through stalls, new stretches of playing and
/// re-measurements (a reply that stutters must not keep the user from interrupting it), and
/// starts again after [`DEAF_RESET`] of silence from the speaker (another reply may play
/// through another device).
const NO_ECHO_AFTER: u64 = INPUT_SAMPLE_RATE as u64 * 3 / 2;
const DEAF_RESET: u64 = INPUT_SAMPLE_RATE as u64;

/// Microphone history kept for the delay measurement (2 s).
const HISTORY: usize = 2 * INPUT_SAMPLE_RATE as usize;
/// Longest correlation window (1 s) and shortest (0.25 s).
const MEASURE_MAX: usize = INPUT_SAMPLE_RATE as usize;
const MEASURE_MIN: usize = INPUT_SAMPLE_RATE as usize / 4;
/// Playing time between two tries at a fresh measurement (0.25 s), and between two tracking
/// measurements once aligned (1 s).
const RETRY_AFTER: u64 = INPUT_SAMPLE_RATE as u64 / 4;
const TRACK_AFTER: u64 = INPUT_SAMPLE_RATE as u64;
/// Longest stretch of microphone after a collapse used to confirm the alignment (0.5 s), and
/// how long a collapse found to be the user is not looked into again (1 s).
const CONFIRM_WINDOW: usize = INPUT_SAMPLE_RATE as usize / 2;
const CONFIRM_HOLD: u64 = INPUT_SAMPLE_RATE as u64;
/// After the alignment moved, the gate judges nothing for this long (0.5 s), and then not
/// before the canceller has again reached [`GateConfig::min_erle_db`]: the filter is right
/// again at once only when the move was measured to the sample.
const SETTLE: u64 = INPUT_SAMPLE_RATE as u64 / 2;
/// A converged canceller that attenuates windows in a row by less than this (dB) while the
/// assistant is audible, or whose gate says "user" then, has "collapsed": the user started
/// talking, or the echo moved in time under the filter (an underrun). Its adaptation pauses
/// and the gate's verdict is withheld until the delay, measured on the microphone since the
/// collapse (at least [`MEASURE_MIN`]), tells which: unchanged (or no echo to be found: the
/// microphone is not mostly echo) means the user; moved means the echo, and the filter is
/// moved with it. The attenuation recovering in between settles nothing (the user pauses
/// between words); after [`SUSPECT_LIMIT`] without a settling measurement the room itself
/// changed: learn it.
const SUSPECT_ATTENUATION: f32 = 6.0;
const SUSPECT_WINDOWS: u32 = 2;
const SUSPECT_LIMIT: u64 = 2 * INPUT_SAMPLE_RATE as u64;
/// The echo may arrive up to this long before the anchoring says it should (50 ms).
const EARLY_LIMIT: i64 = INPUT_SAMPLE_RATE as i64 / 20;
/// A correlation peak this far above the background is believed...
const MIN_CONFIDENCE: f32 = 8.0;
/// ... and may move the alignment at once when it is this clear; otherwise only by up to
/// [`FRESH_JUMP`] (30 ms, about the anchoring error) when the alignment is being measured
/// afresh, and in every other case once the next measurement agrees.
const SURE_CONFIDENCE: f32 = 20.0;
const FRESH_JUMP: i64 = 480;
/// Changes of at most this many samples are noise, not a new alignment.
const SAME: i64 = 2;
/// Mean reference power above which the assistant counts as audible (-60 dBFS).
const AUDIBLE_POWER: f32 = 1e-6;

/// How the assistant keeps from hearing itself. The string forms (`FromStr`/`Display`) are
/// `off`, `gate`, `cancel` and `half-duplex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EchoMode {
    /// Nothing: every detected speech start counts. For headsets.
    Off,
    /// The VAD hears the microphone as it is; the canceller runs only to tell the user from the
    /// echo, and a speech start while the assistant is audible counts only if the gate says it
    /// is the user.
    Gate,
    /// The canceller's output goes to the VAD and into the utterances, and the gate judges
    /// speech starts while the assistant is audible. For laptop speakers.
    #[default]
    Cancel,
    /// The microphone is muted while the assistant is audible (plus
    /// [`EchoConfig::half_duplex_tail_ms`]): no barge-in at all, but nothing to get wrong.
    HalfDuplex,
}

impl std::str::FromStr for EchoMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "off" | "none" => Ok(Self::Off),
            "gate" => Ok(Self::Gate),
            "cancel" | "aec" => Ok(Self::Cancel),
            "half-duplex" | "halfduplex" => Ok(Self::HalfDuplex),
            other => Err(format!(
                "unknown echo mode {other:?} (expected off, gate, cancel or half-duplex)"
            )),
        }
    }
}

impl std::fmt::Display for EchoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Gate => "gate",
            Self::Cancel => "cancel",
            Self::HalfDuplex => "half-duplex",
        })
    }
}

/// Echo handling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EchoConfig {
    pub mode: EchoMode,
    /// Length of the echo path the filter models, after the measured arrival (ms; default
    /// 128). Longer covers more of a reverberant room's tail and costs proportionally more.
    pub filter_ms: u32,
    /// NLMS step (0 < step ≤ 1; default 0.7): larger converges faster, smaller is steadier.
    pub step: f32,
    /// Longest bulk delay searched for, from the playback's counter to the echo (ms; default
    /// 500): device buffers on both sides plus the way through the air.
    pub max_delay_ms: u32,
    /// Half duplex keeps the microphone muted this long after the assistant's last sound left
    /// the speaker (ms; default 200): the room's reverberation.
    pub half_duplex_tail_ms: u32,
    pub gate: GateConfig,
}

impl Default for EchoConfig {
    fn default() -> Self {
        Self {
            mode: EchoMode::Cancel,
            filter_ms: 128,
            step: 0.7,
            max_delay_ms: 500,
            half_duplex_tail_ms: 200,
            gate: GateConfig::default(),
        }
    }
}

/// What the canceller has measured, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EchoStats {
    pub mode: EchoMode,
    /// The measured bulk delay (ms) from the playback's counter to the echo's arrival.
    pub delay_ms: Option<f32>,
    /// Confidence of the last believed delay measurement (peak over background).
    pub delay_confidence: f32,
    /// Stretches of playing the reference has been placed in (a new one for every reply, and
    /// after every stall or suspect timing it noticed): each is measured afresh.
    pub generations: u64,
    /// Delay measurements tried and accepted, and how often the filter was moved.
    pub delay_attempts: u64,
    pub delay_accepted: u64,
    pub realignments: u64,
    /// The gate's tracked ERLE (dB).
    pub erle_db: f32,
    /// Microphone and output energy summed over the blocks in which the assistant was audible
    /// and the filter aligned; their ratio is the ERLE over that time (double talk included).
    pub echo_mic_energy: f64,
    pub echo_out_energy: f64,
    /// The assistant was audible in the last processed chunk.
    pub audible: bool,
    /// The gate's current verdict.
    pub user_speech: bool,
    /// Utterances the listener dropped as echo.
    pub suppressed_utterances: u64,
    /// Collapses of the canceller's attenuation (see the module documentation), and how many
    /// of them turned out to be the echo moving (the gate's verdict was then refused).
    pub collapses: u64,
    pub vetoes: u64,
}

impl EchoStats {
    /// ERLE over `echo_mic_energy` / `echo_out_energy` (dB), once there is some.
    pub fn measured_erle_db(&self) -> Option<f32> {
        (self.echo_out_energy > 0.0)
            .then(|| (10.0 * (self.echo_mic_energy / self.echo_out_energy).log10()) as f32)
    }
}

/// A handle on a canceller's [`EchoStats`], readable from any thread.
#[derive(Debug, Clone, Default)]
pub struct EchoStatus(Arc<Mutex<EchoStats>>);

impl EchoStatus {
    pub fn snapshot(&self) -> EchoStats {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Zeroes the summed energies (to measure ERLE over a stretch of interest).
    pub fn reset_energies(&self) {
        let mut stats = self.0.lock().unwrap_or_else(|p| p.into_inner());
        stats.echo_mic_energy = 0.0;
        stats.echo_out_energy = 0.0;
    }

    fn update(&self, f: impl FnOnce(&mut EchoStats)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Window accumulators between two [`EchoCanceller::judge`] calls.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    mic: f64,
    out: f64,
    len: usize,
    audible: bool,
    aligned: bool,
}

/// The echo canceller on the 16 kHz microphone signal, with its gate. See the module
/// documentation. Not for audio callbacks: it locks the reference briefly and allocates
/// when it measures the delay.
pub struct EchoCanceller {
    config: EchoConfig,
    reference: EchoReference,
    filter: AdaptiveFilter,
    gate: EchoGate,
    estimator: DelayEstimator,
    status: EchoStatus,
    /// Microphone samples handed in and processed.
    given: u64,
    done: u64,
    /// Wall index of microphone sample 0 on the current stream's clock.
    epoch: Option<f64>,
    /// The epoch before a stream restart, to carry the alignment over.
    epoch_before_restart: Option<f64>,
    fifo: Vec<f32>,
    /// The reference's wall index of the echo's arrival for microphone sample `s` is
    /// `s + offset`.
    offset: Option<i64>,
    /// The reference generation the alignment was measured on.
    aligned_generation: Option<u64>,
    generation: u64,
    /// Microphone sample at which the current generation started playing.
    generation_start: u64,
    /// A measurement waiting for confirmation by a later one, and the microphone sample it was
    /// measured up to.
    candidate: Option<(i64, u64)>,
    /// Audible playing, in microphone samples, during which no echo has been found; and the
    /// silence from the speaker since it was last audible.
    unheard: u64,
    inaudible: u64,
    /// The reference's [`EchoReference::stalled`] when last looked at.
    stalled: f64,
    audible_since_try: u64,
    audible_since_measure: u64,
    mic_history: Vec<f32>,
    x: Vec<f32>,
    block_out: Vec<f32>,
    measure_ref: Vec<f32>,
    measure_mic: Vec<f32>,
    pending: Pending,
    last_audible: bool,
    /// Windows in a row that the canceller barely attenuated.
    suspect: u32,
    /// Where (microphone sample) the attenuation collapsed, while that is being looked into,
    /// and until when a collapse found to be the user is not looked into again.
    collapse_at: Option<u64>,
    user_confirmed_until: u64,
    /// Until when (microphone sample) the gate judges nothing after the alignment moved.
    settle_until: u64,
    /// Microphone sample at the last delay measurement.
    last_measure: u64,
}

impl EchoCanceller {
    /// A canceller reading the speaker's audio from `reference`.
    pub fn new(config: EchoConfig, reference: EchoReference) -> Self {
        let taps = (config.filter_ms.clamp(8, 1000) as usize * INPUT_SAMPLE_RATE as usize / 1000)
            .div_ceil(BLOCK);
        let filter = AdaptiveFilter::new(BLOCK, taps.max(1), config.step);
        let status = EchoStatus::default();
        status.update(|s| s.mode = config.mode);
        Self {
            gate: EchoGate::new(config.gate.clone()),
            config,
            reference,
            filter,
            estimator: DelayEstimator::new(),
            status,
            given: 0,
            done: 0,
            epoch: None,
            epoch_before_restart: None,
            fifo: Vec::with_capacity(4 * BLOCK),
            offset: None,
            aligned_generation: None,
            generation: 0,
            generation_start: 0,
            candidate: None,
            unheard: 0,
            inaudible: 0,
            stalled: 0.0,
            audible_since_try: 0,
            audible_since_measure: 0,
            mic_history: Vec::with_capacity(HISTORY + 4 * BLOCK),
            x: Vec::new(),
            block_out: vec![0.0; BLOCK],
            measure_ref: Vec::new(),
            measure_mic: Vec::new(),
            pending: Pending::default(),
            last_audible: false,
            suspect: 0,
            collapse_at: None,
            user_confirmed_until: 0,
            settle_until: 0,
            last_measure: 0,
        }
    }

    pub fn config(&self) -> &EchoConfig {
        &self.config
    }

    pub fn mode(&self) -> EchoMode {
        self.config.mode
    }

    /// Switches the mode on the fly (the filter keeps what it learnt).
    pub fn set_mode(&mut self, mode: EchoMode) {
        self.config.mode = mode;
        self.status.update(|s| s.mode = mode);
    }

    /// The reference this canceller reads.
    pub fn reference(&self) -> &EchoReference {
        &self.reference
    }

    /// A handle on the statistics.
    pub fn status(&self) -> EchoStatus {
        self.status.clone()
    }

    pub fn gate(&self) -> &EchoGate {
        &self.gate
    }

    /// The gate's verdict: the recent speech is the user's (always true with the echo handling
    /// off, and whenever the assistant has not been audible).
    pub fn is_user_speech(&self) -> bool {
        self.config.mode == EchoMode::Off
            || (self.gate.is_user_speech() && self.collapse_at.is_none())
    }

    /// While [`is_user_speech`](Self::is_user_speech): how many judged windows back the user's
    /// speech began (0: the latest).
    pub fn user_speech_onset(&self) -> Option<usize> {
        if self.is_user_speech() {
            self.gate.user_speech_onset()
        } else {
            None
        }
    }

    /// The assistant could be heard in the last processed chunk.
    pub fn assistant_audible(&self) -> bool {
        self.last_audible
    }

    /// Counts an utterance that was dropped as echo (the listener does this).
    pub fn count_suppressed(&self) {
        self.status.update(|s| s.suppressed_utterances += 1);
    }

    /// The capture stream was reopened: its clock starts afresh. The measured delay is kept
    /// (same devices, most likely) and confirmed again.
    pub fn restart_stream(&mut self) {
        if let Some(epoch) = self.epoch.take() {
            self.epoch_before_restart = Some(epoch);
        }
        self.aligned_generation = None;
    }

    /// Cancels echo in `mic` (16 kHz mono, captured just now) and appends the result to `out`.
    /// Output comes in whole [`BLOCK`]s, sample-aligned with the input: after a call, `out`
    /// has grown by every complete block handed in so far.
    pub fn process(&mut self, mic: &[f32], out: &mut Vec<f32>) {
        self.process_at(mic, Instant::now(), out);
    }

    /// [`process`](Self::process) with the time at which the last sample of `mic` was
    /// available (for tests and replay).
    pub fn process_at(&mut self, mic: &[f32], now: Instant, out: &mut Vec<f32>) {
        self.given += mic.len() as u64;
        self.update_clock(now);
        self.fifo
            .extend(mic.iter().map(|s| if s.is_finite() { *s } else { 0.0 }));
        let n = self.fifo.len() / BLOCK * BLOCK;
        if n == 0 {
            return;
        }
        let s0 = self.done;
        let audible = self.audible(s0, n);
        self.last_audible = audible;
        let start = out.len();
        match self.config.mode {
            EchoMode::Off => out.extend_from_slice(&self.fifo[..n]),
            EchoMode::HalfDuplex => {
                if audible || self.audible_tail(s0, n) {
                    out.resize(start + n, 0.0);
                } else {
                    out.extend_from_slice(&self.fifo[..n]);
                }
            }
            EchoMode::Gate | EchoMode::Cancel => self.cancel(s0, n, audible, out),
        }
        debug_assert_eq!(out.len(), start + n);
        self.pending.audible |= audible;
        self.remember_mic(n);
        self.fifo.drain(..n);
        self.done += n as u64;
        if audible {
            self.audible_since_try += n as u64;
            self.audible_since_measure += n as u64;
            self.inaudible = 0;
            if self.offset.is_none() {
                self.unheard += n as u64;
            }
        } else {
            self.inaudible += n as u64;
            if self.inaudible >= DEAF_RESET {
                self.unheard = 0;
            }
        }
        if self.config.mode != EchoMode::Off {
            self.maybe_measure();
        }
        let (erle, user) = (self.gate.erle_db(), self.is_user_speech());
        self.status.update(|s| {
            s.erle_db = erle;
            s.audible = audible;
            s.user_speech = user;
        });
    }

    /// Passes on what is left of an incomplete block, uncancelled (end of the stream).
    pub fn flush(&mut self, out: &mut Vec<f32>) {
        out.extend_from_slice(&self.fifo);
        self.done += self.fifo.len() as u64;
        self.remember_mic(self.fifo.len());
        self.fifo.clear();
    }

    /// Completes the judgement of the audio processed since the last call (one VAD window in
    /// the listener): `speech` is the VAD's call on it. Returns the window's verdict; the
    /// running one is [`is_user_speech`](Self::is_user_speech).
    pub fn judge(&mut self, speech: bool) -> GateWindow {
        let p = std::mem::take(&mut self.pending);
        let window = match self.config.mode {
            EchoMode::Off => self.gate.observe_quiet(speech),
            EchoMode::HalfDuplex => self.gate.observe_quiet(speech && !p.audible),
            EchoMode::Gate | EchoMode::Cancel => {
                if !p.audible {
                    self.gate.observe_quiet(speech)
                } else if !p.aligned && self.deaf() {
                    // No echo has ever been found, after this long of playing: the microphone
                    // does not hear the speaker (headphones), so speech is the user's.
                    self.gate.observe_quiet(speech)
                } else if !p.aligned || p.len == 0 || self.done < self.settle_until {
                    self.gate.observe_unsure()
                } else {
                    let n = p.len as f64;
                    self.gate
                        .observe_power((p.mic / n) as f32, (p.out / n) as f32, speech)
                }
            }
        };
        let gated = matches!(self.config.mode, EchoMode::Gate | EchoMode::Cancel);
        if gated && p.aligned {
            self.watch_alignment(window.attenuation_db, p.len, p.audible);
        }
        let user = self.is_user_speech();
        self.status.update(|s| s.user_speech = user);
        window
    }

    /// Watches for a collapse of the attenuation: see [`SUSPECT_ATTENUATION`].
    fn watch_alignment(&mut self, attenuation: Option<f32>, window: usize, audible: bool) {
        match attenuation {
            Some(a) if a < SUSPECT_ATTENUATION => self.suspect += 1,
            Some(_) => self.suspect = 0,
            None => {}
        }
        let Some(at) = self.collapse_at else {
            // A "user" verdict while the assistant is audible is checked the same way: the
            // windows it rests on may be echo that moved.
            let verdict = audible && self.gate.is_user_speech();
            if !(verdict || self.suspect >= SUSPECT_WINDOWS)
                || self.done < self.user_confirmed_until
            {
                return;
            }
            if self.gate.ready() {
                let back = match self.gate.user_speech_onset() {
                    Some(k) if verdict => k + 1,
                    _ => self.suspect as usize,
                };
                self.collapse_at = Some(self.done.saturating_sub((back * window) as u64));
                self.filter.freeze(true);
                self.status.update(|s| s.collapses += 1);
            } else if self.done - self.last_measure >= RETRY_AFTER {
                // Still converging: the alignment may just be off; measure on recent audio.
                let window = MEASURE_MIN.min(self.mic_history.len());
                let generation = self.generation;
                if let Some((offset, confidence)) = self.measure(window) {
                    self.accept(offset, confidence, true, generation);
                }
            }
            return;
        };
        let since = self.done - at;
        if since >= SUSPECT_LIMIT {
            // No measurement settled it: a room that changed. What the gate saw in the
            // meantime is not to be trusted.
            self.gate.reset_votes();
            self.end_collapse();
            return;
        }
        if since < MEASURE_MIN as u64 || self.done - self.last_measure < window as u64 {
            return;
        }
        let length = (since as usize)
            .min(CONFIRM_WINDOW)
            .min(self.mic_history.len());
        let generation = self.generation;
        let user = |me: &mut Self| {
            // The user is talking; while they go on, the attenuation stays low.
            me.user_confirmed_until = me.done + CONFIRM_HOLD;
            me.end_collapse();
        };
        match (self.measure(length), self.offset) {
            (Some((offset, _)), Some(current)) if (offset - current).abs() <= SAME => user(self),
            (Some((offset, confidence)), _) => {
                // The echo moved: the windows the gate took for the user were the assistant.
                self.accept(offset, confidence, true, generation);
                if self.offset == Some(offset) {
                    self.gate.reset_votes();
                    self.status.update(|s| s.vetoes += 1);
                    self.end_collapse();
                }
            }
            // No echo in the microphone to speak of: it is someone else.
            (None, _) => user(self),
        }
    }

    fn end_collapse(&mut self) {
        self.collapse_at = None;
        self.filter.freeze(false);
        self.suspect = 0;
    }

    fn update_clock(&mut self, now: Instant) {
        // A sample cannot be handed in before it was captured: the earliest epoch consistent
        // with every call is the best estimate of the capture clock.
        let candidate = self.reference.wall_index(now) - self.given as f64;
        let epoch = self.epoch.map_or(candidate, |e| e.min(candidate));
        self.epoch = Some(epoch);
        if let Some(before) = self.epoch_before_restart.take() {
            // Same delay on the new clock: the alignment moves with the epoch.
            if let Some(offset) = self.offset.as_mut() {
                *offset += (epoch - before).round() as i64;
            }
        }
    }

    fn epoch(&self) -> i64 {
        self.epoch.unwrap_or(0.0).round() as i64
    }

    /// The alignment, if it was measured on the reference's current generation and has settled;
    /// an older one may be off by anything after a stall or a reopened device, and a new one
    /// may be wrong (the gate is careful for a while).
    fn confirmed_offset(&self) -> Option<i64> {
        self.offset.filter(|_| {
            self.aligned_generation == Some(self.reference.generation())
                && self.done >= self.settle_until
        })
    }

    /// Whether the reference could be in the microphone samples `s0..s0 + n`.
    fn audible(&self, s0: u64, n: usize) -> bool {
        let (s0, s1) = (s0 as i64, (s0 + n as u64) as i64);
        let (lo, hi) = match self.confirmed_offset() {
            // The filter's span: arrivals from PRE_DELAY before the measured one to the end of
            // the filter.
            Some(offset) => (
                s0 + offset + PRE_DELAY as i64 - self.filter.len() as i64,
                s1 + offset + PRE_DELAY as i64,
            ),
            // Not measured (again) yet: anywhere in the searched range.
            None => (
                s0 + self.epoch() - self.max_delay() - self.filter.len() as i64,
                s1 + self.epoch() + EARLY_LIMIT,
            ),
        };
        self.reference.power(lo, hi) > AUDIBLE_POWER
    }

    /// Half duplex: the reference within the tail before `s0..s0 + n`.
    fn audible_tail(&self, s0: u64, n: usize) -> bool {
        let tail = i64::from(self.config.half_duplex_tail_ms) * INPUT_SAMPLE_RATE as i64 / 1000;
        let (s0, s1) = (s0 as i64, (s0 + n as u64) as i64);
        let (lo, hi) = match self.confirmed_offset() {
            Some(offset) => (
                s0 + offset - self.filter.len() as i64 - tail,
                s1 + offset + PRE_DELAY as i64,
            ),
            None => (
                s0 + self.epoch() - self.max_delay() - tail,
                s1 + self.epoch() + EARLY_LIMIT,
            ),
        };
        self.reference.power(lo, hi) > AUDIBLE_POWER
    }

    fn max_delay(&self) -> i64 {
        i64::from(self.config.max_delay_ms.clamp(10, 5000)) * INPUT_SAMPLE_RATE as i64 / 1000
    }

    fn cancel(&mut self, s0: u64, n: usize, audible: bool, out: &mut Vec<f32>) {
        let Some(offset) = self.offset else {
            out.extend_from_slice(&self.fifo[..n]);
            return;
        };
        self.x.resize(n, 0.0);
        let generation = self
            .reference
            .fetch(s0 as i64 + offset + PRE_DELAY as i64, &mut self.x);
        let aligned = self.aligned_generation == Some(generation);
        // Learn only on a measured alignment: before it is measured the reference may be off
        // by a device period or more, and the filter would unlearn the room to follow it.
        self.filter.freeze(!aligned || self.collapse_at.is_some());
        let pass_through = self.config.mode == EchoMode::Gate;
        let (mut mic_e, mut out_e) = (0.0f64, 0.0f64);
        for (d, x) in self.fifo[..n]
            .chunks_exact(BLOCK)
            .zip(self.x.chunks_exact(BLOCK))
        {
            let report = self.filter.process_block(d, x, &mut self.block_out);
            mic_e += f64::from(report.mic);
            out_e += f64::from(report.out);
            if pass_through {
                out.extend_from_slice(d);
            } else {
                out.extend_from_slice(&self.block_out);
            }
        }
        self.pending.mic += mic_e;
        self.pending.out += out_e;
        self.pending.len += n;
        self.pending.aligned = aligned;
        if audible && aligned {
            self.status.update(|s| {
                s.echo_mic_energy += mic_e;
                s.echo_out_energy += out_e;
            });
        }
    }

    fn remember_mic(&mut self, n: usize) {
        let start = self.fifo.len().min(n);
        self.mic_history.extend_from_slice(&self.fifo[..start]);
        if self.mic_history.len() > HISTORY {
            let excess = self.mic_history.len() - HISTORY;
            self.mic_history.drain(..excess);
        }
    }

    /// No echo has ever been found in [`NO_ECHO_AFTER`] of playing: the microphone does not
    /// hear the speaker (headphones).
    fn deaf(&self) -> bool {
        self.offset.is_none() && self.unheard >= NO_ECHO_AFTER
    }

    /// Decides whether to measure the delay now, and does.
    fn maybe_measure(&mut self) {
        let generation = self.reference.generation();
        if generation != self.generation {
            self.generation = generation;
            self.status.update(|s| s.generations = generation);
            // Where the new stretch began, in microphone samples.
            let start = self
                .reference
                .segment_start()
                .map_or(self.done as i64, |w| w - self.epoch());
            self.generation_start = start.clamp(0, self.done as i64) as u64;
            // Playing time the reference had counted that a stall showed did not play.
            let stalled = self.reference.stalled();
            let lost = (stalled - self.stalled).max(0.0).ceil() as u64;
            self.stalled = stalled;
            self.unheard = self.unheard.saturating_sub(lost);
            self.audible_since_try = 0;
            self.candidate = None;
        }
        let fresh = self.offset.is_none() || self.aligned_generation != Some(generation);
        if fresh {
            if self.audible_since_try < RETRY_AFTER {
                return;
            }
            self.audible_since_try = 0;
            let since = (self.done - self.generation_start.min(self.done)) as usize;
            let mut window = since.min(MEASURE_MAX).min(self.mic_history.len());
            // A microphone that has heard no echo for this long is taken to be deaf to the
            // speaker, and what it hears to be the user: a peak found now may be the user's
            // voice matching the reference by chance. So each measurement looks only at the
            // audio since the last one, and a delay is believed when two in a row find it (a
            // chance peak does not repeat at the same delay); until then the speech stays the
            // user's.
            let deaf = self.deaf();
            if deaf {
                window = window.min(MEASURE_MIN);
            }
            if window < MEASURE_MIN {
                return;
            }
            let Some((offset, confidence)) = self.measure(window) else {
                if deaf {
                    self.candidate = None;
                }
                return;
            };
            if deaf {
                let confirmed = self
                    .candidate
                    .is_some_and(|(c, _)| (c - offset).abs() <= SAME);
                if !confirmed {
                    self.candidate = Some((offset, self.done));
                    return;
                }
                self.candidate = None;
            }
            self.accept(offset, confidence, true, generation);
        } else if self.audible_since_measure >= TRACK_AFTER {
            self.audible_since_measure = 0;
            let window = MEASURE_MAX.min(self.mic_history.len());
            if let Some((offset, confidence)) = self.measure(window) {
                self.accept(offset, confidence, false, generation);
            }
        }
    }

    /// Cross-correlates the last `window` microphone samples with the reference over the
    /// searched delays; returns the echo's arrival as an offset, and the peak's confidence, if
    /// the peak is clear.
    fn measure(&mut self, window: usize) -> Option<(i64, f32)> {
        let s_end = self.done as i64;
        let s_start = s_end - window as i64;
        let span = (self.max_delay() + EARLY_LIMIT) as usize;
        let off_min = self.epoch() - self.max_delay();
        self.last_measure = self.done;
        self.measure_mic.clear();
        self.measure_mic
            .extend_from_slice(&self.mic_history[self.mic_history.len() - window..]);
        self.measure_ref.resize(window + span, 0.0);
        self.reference
            .fetch(s_start + off_min, &mut self.measure_ref);
        let peak = self
            .estimator
            .find(&self.measure_mic, &self.measure_ref, span);
        self.status.update(|s| s.delay_attempts += 1);
        let peak = peak.filter(|p| p.confidence >= MIN_CONFIDENCE)?;
        let confidence = peak.confidence;
        self.status.update(|s| s.delay_confidence = confidence);
        Some((off_min + peak.lag as i64, confidence))
    }

    fn accept(&mut self, offset: i64, confidence: f32, fresh: bool, generation: u64) {
        let accepted = match self.offset {
            None => {
                self.filter.reset();
                true
            }
            Some(current) => {
                let jump = offset - current;
                if jump.abs() <= SAME {
                    self.candidate = None;
                    self.aligned_generation = Some(generation);
                    self.status.update(|s| s.delay_accepted += 1);
                    return;
                }
                // Confirmed by a measurement on at least a quarter second of new audio.
                let confirmed = self.candidate.is_some_and(|(c, at)| {
                    (c - offset).abs() <= SAME && self.done >= at + MEASURE_MIN as u64
                });
                if confirmed || confidence >= SURE_CONFIDENCE || (fresh && jump.abs() <= FRESH_JUMP)
                {
                    self.realign(offset);
                    true
                } else {
                    if self
                        .candidate
                        .is_none_or(|(c, _)| (c - offset).abs() > SAME)
                    {
                        self.candidate = Some((offset, self.done));
                    }
                    false
                }
            }
        };
        if accepted {
            self.settle_until = self.done + SETTLE;
            if self.offset.is_some() {
                // The echo moved: whatever the canceller achieved before says nothing about
                // now. The gate waits until it has seen it work again.
                self.gate.reset_erle();
            }
            self.offset = Some(offset);
            self.candidate = None;
            self.aligned_generation = Some(generation);
            let delay = (self.epoch() - offset) as f32 * 1000.0 / INPUT_SAMPLE_RATE as f32;
            self.status.update(|s| {
                s.delay_accepted += 1;
                s.delay_ms = Some(delay);
            });
        }
    }

    /// Moves the filter to alignment `new`. The measurement says the echo's main arrival is
    /// now at tap [`PRE_DELAY`]; the learnt echo path is moved so that its strongest tap is
    /// there too. (Moving it by the change of alignment instead would be right only if the old
    /// alignment still held, and not when the sound moved under it: after an underrun the
    /// filter's taps are right for the new alignment as they are.)
    fn realign(&mut self, new: i64) {
        let need = self.filter.len() + BLOCK;
        let mut history = vec![0.0; need];
        let start = self.done as i64 - need as i64 + new + PRE_DELAY as i64;
        self.reference.fetch(start, &mut history);
        let shift = self
            .filter
            .peak_tap()
            .map_or(0, |k| PRE_DELAY as i64 - k as i64);
        self.filter.realign(shift, &history);
        self.status.update(|s| s.realignments += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            EchoMode::Off,
            EchoMode::Gate,
            EchoMode::Cancel,
            EchoMode::HalfDuplex,
        ] {
            assert_eq!(mode.to_string().parse::<EchoMode>(), Ok(mode));
        }
        assert_eq!("Half_Duplex".parse::<EchoMode>(), Ok(EchoMode::HalfDuplex));
        assert!("loud".parse::<EchoMode>().is_err());
    }

    /// A simulated sound card: the playback consumes the reference at exactly 16 kHz from
    /// wall 0, the microphone hears it `delay` samples later through `h`, plus `near`.
    struct Room {
        reference: EchoReference,
        origin: Instant,
    }

    impl Room {
        fn at(&self, wall: i64) -> Instant {
            self.origin + Duration::from_secs_f64(wall as f64 / 16_000.0)
        }
    }

    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    fn run_room(
        mode: EchoMode,
        far: &[f32],
        near: &[f32],
        delay: usize,
    ) -> (Vec<f32>, Vec<f32>, EchoCanceller) {
        run_room_from(mode, far, near, delay, 0)
    }

    /// [`run_room`] with a microphone that hears the speaker only from sample `heard_from` on.
    fn run_room_from(
        mode: EchoMode,
        far: &[f32],
        near: &[f32],
        delay: usize,
        heard_from: usize,
    ) -> (Vec<f32>, Vec<f32>, EchoCanceller) {
        let reference = EchoReference::new(16_000).unwrap();
        let room = Room {
            origin: Instant::now() + Duration::from_secs(1),
            reference: reference.clone(),
        };
        // Echo: a direct path and two reflections.
        let mut mic = vec![0.0f32; far.len()];
        for (n, m) in mic.iter_mut().enumerate() {
            let tap = |k: usize, g: f32| {
                if n >= delay + k && n >= heard_from {
                    g * far[n - delay - k]
                } else {
                    0.0
                }
            };
            *m = tap(0, 0.5) + tap(37, -0.2) + tap(300, 0.1) + near.get(n).copied().unwrap_or(0.0);
        }
        let config = EchoConfig {
            mode,
            ..EchoConfig::default()
        };
        let mut canceller = EchoCanceller::new(config, reference);
        // The whole reference is pushed at the start (as a daemon that generates faster than
        // real time does): anchored at wall 0.
        room.reference.push_at(far, 0, room.at(0));
        let mut out = Vec::new();
        for (i, chunk) in mic.chunks(512).enumerate() {
            // Handed in 2 ms after the chunk's last sample was captured.
            let end = ((i + 1) * 512) as i64 + 32;
            canceller.process_at(chunk, room.at(end), &mut out);
            canceller.judge(true);
        }
        (mic, out, canceller)
    }

    #[test]
    fn finds_the_delay_and_cancels_noise_echo() {
        let far: Vec<f32> = noise(16_000 * 5, 11).iter().map(|v| v * 0.2).collect();
        let (mic, out, canceller) = run_room(EchoMode::Cancel, &far, &[], 2400);
        let stats = canceller.status().snapshot();
        let delay = stats.delay_ms.unwrap();
        // 2400 samples (150 ms) plus the 2 ms hand-in lag the clock cannot see past.
        assert!((delay - 152.0).abs() < 0.5, "{stats:?}");
        let e = |v: &[f32]| v.iter().map(|s| s * s).sum::<f32>();
        let tail = 16_000 * 3..mic.len();
        let erle = 10.0 * (e(&mic[tail.clone()]) / e(&out[tail])).log10();
        assert!(erle > 30.0, "ERLE {erle:.1} dB; {stats:?}");
        assert!(canceller.gate().ready());
    }

    /// A microphone that does not hear the speaker (headphones): the playback's timing shifts
    /// (the reference asks for a new measurement), then the user speaks, and a stretch of what they say
    /// happens to match the reference at some delay. The canceller must still find no echo and
    /// hand the speech to the user.
    #[test]
    fn a_deaf_microphone_leaves_speech_to_the_user_through_retimings_and_chance_peaks() {
        let rate = 16_000usize;
        let far: Vec<f32> = noise(rate * 5, 3).iter().map(|v| v * 0.2).collect();
        // The user speaks from 2.2 s to 3.7 s, and what they say matches the reference by
        // chance: every 0.2 s at another delay (as two voices whose pitch meets now and then).
        // Each stretch makes a peak one measurement believes; none makes it twice.
        let talk = rate * 22 / 10;
        let mut mic = vec![0.0f32; far.len()];
        let lags = [1200usize, 3000, 4400, 2000, 5600, 800, 3600, 6400];
        for (k, lag) in lags.iter().enumerate() {
            let at = talk + k * rate / 5;
            let end = (at + rate / 5).min(talk + rate * 3 / 2);
            if at < end {
                mic[at..end].copy_from_slice(&far[at - lag..end - lag]);
            }
        }
        let reference = EchoReference::new(16_000).unwrap();
        let room = Room {
            origin: Instant::now() + Duration::from_secs(1),
            reference: reference.clone(),
        };
        let mut canceller = EchoCanceller::new(
            EchoConfig {
                mode: EchoMode::Cancel,
                ..EchoConfig::default()
            },
            reference,
        );
        // The playback is fed two chunks ahead; from 1.2 s on its counter reads 20 ms late,
        // so the reference asks for the delay to be measured again (a new generation) without
        // moving its samples.
        let (chunk, late_at, late) = (512usize, rate * 12 / 10, 320usize);
        let mut out = Vec::new();
        let mut user_at = None;
        for (i, m) in mic.chunks(chunk).enumerate() {
            let wall = i * chunk;
            let played = if wall >= late_at { wall - late } else { wall };
            let ahead = (i + 2) * chunk;
            if ahead < far.len() {
                let end = (ahead + chunk).min(far.len());
                room.reference
                    .push_at(&far[ahead..end], played as u64, room.at(wall as i64));
            }
            canceller.process_at(m, room.at((wall + chunk) as i64 + 32), &mut out);
            let speech = m.iter().any(|v| *v != 0.0);
            canceller.judge(speech);
            if speech && canceller.is_user_speech() && user_at.is_none() {
                user_at = Some(wall + chunk);
            }
        }
        let stats = canceller.status().snapshot();
        assert!(
            stats.generations >= 2,
            "the stall re-anchored the reference: {stats:?}"
        );
        assert_eq!(stats.delay_ms, None, "no echo was found: {stats:?}");
        let user_at = user_at.expect("the user's speech was taken for the user");
        // Four windows of votes.
        assert!(
            user_at <= talk + 5 * chunk,
            "taken for the user {} ms after they began",
            (user_at - talk) * 1000 / rate
        );
    }

    /// A microphone that does not hear the speaker, and a reply that comes in bursts: 0.85 s of
    /// speech every second, so that the playback runs dry for 0.15 s each time and every burst
    /// starts a new stretch of the reference (as a daemon whose generation is just short of
    /// real time). The user speaks at 3.2 s, over the fourth burst: their speech must be taken
    /// for theirs, as without the gaps (the gaps once started the "no echo heard" time again
    /// each second, so that the user could never interrupt).
    #[test]
    fn a_deaf_microphone_leaves_speech_to_the_user_through_a_stuttering_playback() {
        let rate = 16_000usize;
        let chunk = 512usize;
        let far: Vec<f32> = noise(rate * 6, 5).iter().map(|v| v * 0.2).collect();
        let talk = rate * 32 / 10;
        let mut mic = vec![0.0f32; rate * 5];
        let voice = noise(rate, 9);
        mic[talk..talk + rate].copy_from_slice(&voice);
        let reference = EchoReference::new(16_000).unwrap();
        let room = Room {
            origin: Instant::now() + Duration::from_secs(1),
            reference: reference.clone(),
        };
        let mut canceller = EchoCanceller::new(
            EchoConfig {
                mode: EchoMode::Cancel,
                ..EchoConfig::default()
            },
            reference,
        );
        let burst = rate * 85 / 100;
        let (mut written, mut played) = (0usize, 0usize);
        let mut out = Vec::new();
        let mut user_at = None;
        for (i, m) in mic.chunks(chunk).enumerate() {
            let wall = i * chunk;
            // The device plays what it was given, a chunk per chunk of time.
            played = (played + chunk).min(written);
            if wall % rate < chunk {
                // A burst arrives and is written at once.
                let end = (written + burst).min(far.len());
                room.reference
                    .push_at(&far[written..end], played as u64, room.at(wall as i64));
                written = end;
            } else {
                room.reference
                    .observe_at(played as u64, room.at(wall as i64));
            }
            canceller.process_at(m, room.at((wall + chunk) as i64 + 32), &mut out);
            let speech = m.iter().any(|v| *v != 0.0);
            canceller.judge(speech);
            if speech && canceller.is_user_speech() && user_at.is_none() {
                user_at = Some(wall + chunk);
            }
        }
        let stats = canceller.status().snapshot();
        assert!(
            stats.generations >= 4,
            "every burst started a new stretch: {stats:?}"
        );
        assert_eq!(stats.delay_ms, None, "no echo was found: {stats:?}");
        let user_at = user_at.expect("the user's speech was taken for the user");
        assert!(
            user_at <= talk + 5 * chunk,
            "taken for the user {} ms after they began",
            (user_at - talk) * 1000 / rate
        );
    }

    /// A playback device slow to start: the reference says the reply plays from the first push,
    /// but the device starts 1.6 s later (the "no echo heard" time would pass meanwhile), and
    /// then the microphone hears the echo. The stall the reference finds when the device starts
    /// takes that time off again: the echo must never be taken for the user.
    #[test]
    fn a_device_slow_to_start_does_not_make_the_microphone_deaf() {
        let rate = 16_000usize;
        let chunk = 512usize;
        let far: Vec<f32> = noise(rate * 6, 7).iter().map(|v| v * 0.2).collect();
        let (start, delay) = (rate * 16 / 10, 2400usize);
        let mut mic = vec![0.0f32; rate * 5];
        for (n, m) in mic.iter_mut().enumerate() {
            if n >= start + delay {
                *m = 0.5 * far[n - start - delay];
            }
        }
        let reference = EchoReference::new(16_000).unwrap();
        let room = Room {
            origin: Instant::now() + Duration::from_secs(1),
            reference: reference.clone(),
        };
        let mut canceller = EchoCanceller::new(
            EchoConfig {
                mode: EchoMode::Cancel,
                ..EchoConfig::default()
            },
            reference,
        );
        // The whole reply is written at once, as a fast generation does.
        room.reference.push_at(&far, 0, room.at(0));
        let mut out = Vec::new();
        for (i, m) in mic.chunks(chunk).enumerate() {
            let wall = i * chunk;
            let played = wall.saturating_sub(start);
            room.reference
                .observe_at(played as u64, room.at(wall as i64));
            canceller.process_at(m, room.at((wall + chunk) as i64 + 32), &mut out);
            let echo = m.iter().any(|v| *v != 0.0);
            canceller.judge(echo);
            assert!(
                !canceller.is_user_speech(),
                "the echo was taken for the user at {} ms",
                (wall + chunk) * 1000 / rate
            );
        }
        assert!(canceller.status().snapshot().delay_ms.is_some());
    }

    /// Headphones unplugged while the assistant speaks: an echo that appears after the
    /// microphone was taken to be deaf is still found and cancelled.
    #[test]
    fn an_echo_that_appears_late_is_found() {
        let far: Vec<f32> = noise(16_000 * 5, 12).iter().map(|v| v * 0.2).collect();
        let (mic, out, canceller) = run_room_from(EchoMode::Cancel, &far, &[], 2400, 16_000 * 2);
        let stats = canceller.status().snapshot();
        let delay = stats.delay_ms.expect("the echo was found");
        assert!((delay - 152.0).abs() < 0.5, "{stats:?}");
        let e = |v: &[f32]| v.iter().map(|s| s * s).sum::<f32>();
        let tail = 16_000 * 4..mic.len();
        let erle = 10.0 * (e(&mic[tail.clone()]) / e(&out[tail])).log10();
        assert!(erle > 20.0, "ERLE {erle:.1} dB; {stats:?}");
    }

    #[test]
    fn half_duplex_mutes_while_playing_and_off_passes_everything() {
        let mut far: Vec<f32> = noise(16_000 * 2, 5).iter().map(|v| v * 0.2).collect();
        far.extend(vec![0.0; 16_000 * 2]);
        let (mic, out, _) = run_room(EchoMode::HalfDuplex, &far, &[], 800);
        assert_eq!(out.len(), mic.len());
        assert!(out[..16_000 * 2].iter().all(|&v| v == 0.0));
        // After the playing ended (plus the delay and the tail), the microphone is back.
        assert_eq!(&out[16_000 * 3..], &mic[16_000 * 3..]);
        let (mic, out, _) = run_room(EchoMode::Off, &far, &[], 800);
        assert_eq!(out, mic);
    }
}
