//! Voice activity detection: the Silero VAD model through ONNX Runtime, and an [`Endpointer`]
//! that turns its per-window speech probabilities into utterances.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`) from the library in the pinned
//! PyPI wheel `onnxruntime==1.31.1`; the model is `silero_vad.onnx` from PyPI `silero-vad==6.2.3`.
//! `tools/fetch_vad.sh` fetches both; [`VadAssets::locate`] finds them or says what is missing.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use lfm2_audio::format::INPUT_SAMPLE_RATE;

use crate::frames_to_duration;

/// Samples the model takes per step: 32 ms at 16 kHz.
pub const WINDOW: usize = 512;
/// Samples of the previous window the model sees again before each new one (Silero v5+).
const CONTEXT: usize = 64;
/// Boundaries are refined on 10 ms frames of the audio itself.
const REFINE_FRAME: u64 = 160;
/// A frame this far under the utterance's loudest frame is quiet.
const REFINE_FLOOR_DB: f32 = -40.0;
/// How far back from the window-aligned end the refinement looks: Silero's probability can stay
/// above the threshold for a few windows after the voice stops.
const REFINE_END_WINDOWS: u64 = 5;
/// How far back from the window-aligned start the refinement looks: weak onsets ("th", "f")
/// come before the probability rises.
const REFINE_START_WINDOWS: u64 = 3;
/// The recurrent state: `state` [2, 1, 128].
const STATE_LEN: usize = 2 * 128;

/// Environment variable naming the ONNX Runtime library.
pub const ORT_LIB_ENV: &str = "LFM2D_ORT_LIB";
/// Environment variable naming the Silero VAD model.
pub const VAD_MODEL_ENV: &str = "LFM2D_VAD_MODEL";
/// Where `tools/fetch_vad.sh` puts the two files, relative to the repository root.
pub const DEFAULT_ORT_LIB: &str = "assets/onnxruntime/libonnxruntime.so.1.31.1";
pub const DEFAULT_VAD_MODEL: &str = "assets/silero_vad.onnx";
const FETCH_HINT: &str = "run `tools/fetch_vad.sh` in the lfm2d repository (it downloads PyPI \
     onnxruntime==1.31.1 and silero-vad==6.2.3 into assets/), or set LFM2D_ORT_LIB and \
     LFM2D_VAD_MODEL to the files";

#[derive(Debug, thiserror::Error)]
pub enum VadError {
    #[error("voice activity detection is not available: {0}")]
    Missing(String),
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    #[error("Silero VAD model {path}: {message}")]
    Model { path: PathBuf, message: String },
}

/// The two files the VAD needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VadAssets {
    pub ort_lib: PathBuf,
    pub model: PathBuf,
}

impl VadAssets {
    /// Finds the files: `LFM2D_ORT_LIB` / `LFM2D_VAD_MODEL` when set, else the default paths
    /// under the current directory, the executable's directory or this source tree, or any of
    /// their parents. The error names each missing file, where it was looked for, and the fetch
    /// command.
    pub fn locate() -> Result<Self, VadError> {
        let mut roots: Vec<PathBuf> = Vec::new();
        if let Ok(cwd) = std::env::current_dir() {
            roots.extend(cwd.ancestors().map(Path::to_path_buf));
        }
        if let Some(exe_dir) = std::env::current_exe()
            .ok()
            .as_deref()
            .and_then(Path::parent)
        {
            roots.extend(exe_dir.ancestors().map(Path::to_path_buf));
        }
        // The repository this crate was built from (audio-io/..).
        roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
        Self::locate_in(
            std::env::var_os(ORT_LIB_ENV).map(PathBuf::from),
            std::env::var_os(VAD_MODEL_ENV).map(PathBuf::from),
            &roots,
        )
    }

    /// [`locate`](Self::locate) with the environment and search roots given.
    pub fn locate_in(
        ort_env: Option<PathBuf>,
        model_env: Option<PathBuf>,
        roots: &[PathBuf],
    ) -> Result<Self, VadError> {
        let find = |env_value: Option<PathBuf>, env: &str, default: &str, what: &str| {
            if let Some(path) = env_value.filter(|p| !p.as_os_str().is_empty()) {
                return if path.is_file() {
                    Ok(path)
                } else {
                    Err(format!("{what}: {env}={} does not exist", path.display()))
                };
            }
            roots
                .iter()
                .map(|root| root.join(default))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    format!(
                        "{what} ({default}) not found under the current directory, the executable's \
                         directory or their parents, and {env} is not set"
                    )
                })
        };
        let ort_lib = find(
            ort_env,
            ORT_LIB_ENV,
            DEFAULT_ORT_LIB,
            "ONNX Runtime library",
        );
        let model = find(
            model_env,
            VAD_MODEL_ENV,
            DEFAULT_VAD_MODEL,
            "Silero VAD model",
        );
        match (ort_lib, model) {
            (Ok(ort_lib), Ok(model)) => Ok(Self { ort_lib, model }),
            (a, b) => {
                let missing: Vec<String> = [a.err(), b.err()].into_iter().flatten().collect();
                Err(VadError::Missing(format!(
                    "{}; {FETCH_HINT}",
                    missing.join("; ")
                )))
            }
        }
    }
}

/// ONNX Runtime allows one environment per process; every VAD shares it.
static ORT_ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment(lib: &Path) -> Result<&'static ort::environment::Environment, VadError> {
    ORT_ENVIRONMENT
        .get_or_init(|| {
            ort::init_from(lib)
                .map_err(|e| format!("cannot load {}: {e}", lib.display()))?
                .with_name("lfm2d")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| VadError::Runtime(format!("{e}; {FETCH_HINT}")))
}

/// The Silero VAD model: one speech probability per [`WINDOW`] samples of 16 kHz audio.
pub struct SileroVad {
    session: ort::session::Session,
    model: PathBuf,
    state: Vec<f32>,
    context: [f32; CONTEXT],
}

impl SileroVad {
    /// Loads ONNX Runtime (once per process) and the model.
    pub fn load(assets: &VadAssets) -> Result<Self, VadError> {
        let env = environment(&assets.ort_lib)?;
        let model_err = |message: String| VadError::Model {
            path: assets.model.clone(),
            message,
        };
        let session = ort::session::Session::builder(env)
            .map_err(|e| VadError::Runtime(e.to_string()))?
            // The model is tiny; one thread avoids a pool of spinning workers on a small machine.
            .with_intra_threads(1)
            .map_err(|e| VadError::Runtime(e.to_string()))?
            .with_inter_threads(1)
            .map_err(|e| VadError::Runtime(e.to_string()))?
            .commit_from_file(&assets.model)
            .map_err(|e| model_err(e.to_string()))?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for wanted in ["input", "state", "sr"] {
            if !names.contains(&wanted) {
                return Err(model_err(format!(
                    "has inputs {names:?}, expected input/state/sr (Silero VAD v5 or later)"
                )));
            }
        }
        Ok(Self {
            session,
            model: assets.model.clone(),
            state: vec![0.0; STATE_LEN],
            context: [0.0; CONTEXT],
        })
    }

    /// Forgets the recurrent state (a new, unrelated stream begins).
    pub fn reset(&mut self) {
        self.state.fill(0.0);
        self.context = [0.0; CONTEXT];
    }

    /// The probability that `window` ([`WINDOW`] samples at 16 kHz) contains speech.
    pub fn probability(&mut self, window: &[f32]) -> Result<f32, VadError> {
        use ort::value::Tensor;
        let err = |e: ort::Error| VadError::Model {
            path: self.model.clone(),
            message: e.to_string(),
        };
        if window.len() != WINDOW {
            return Err(VadError::Model {
                path: self.model.clone(),
                message: format!("a window is {WINDOW} samples, got {}", window.len()),
            });
        }
        let mut input = Vec::with_capacity(CONTEXT + WINDOW);
        input.extend_from_slice(&self.context);
        input.extend_from_slice(window);
        self.context.copy_from_slice(&window[WINDOW - CONTEXT..]);
        let input = Tensor::from_array(([1usize, CONTEXT + WINDOW], input)).map_err(err)?;
        let state = Tensor::from_array(([2usize, 1, 128], self.state.clone())).map_err(err)?;
        let sr =
            Tensor::from_array(([0usize; 0], vec![i64::from(INPUT_SAMPLE_RATE)])).map_err(err)?;
        let outputs = self
            .session
            .run(ort::inputs!["input" => input, "state" => state, "sr" => sr])
            .map_err(|e| VadError::Model {
                path: self.model.clone(),
                message: e.to_string(),
            })?;
        let (_, prob) =
            outputs["output"]
                .try_extract_tensor::<f32>()
                .map_err(|e| VadError::Model {
                    path: self.model.clone(),
                    message: e.to_string(),
                })?;
        let prob = prob.first().copied().unwrap_or(0.0);
        let (_, new_state) =
            outputs["stateN"]
                .try_extract_tensor::<f32>()
                .map_err(|e| VadError::Model {
                    path: self.model.clone(),
                    message: e.to_string(),
                })?;
        if new_state.len() == STATE_LEN {
            self.state.copy_from_slice(new_state);
        }
        Ok(prob)
    }
}

/// Endpointing knobs. The defaults are the usual ones (Silero's and the OpenAI Realtime server
/// VAD's).
#[derive(Debug, Clone, PartialEq)]
pub struct VadConfig {
    /// Speech starts when a window's probability reaches this.
    pub threshold: f32,
    /// Speech continues while the probability stays at or above this (hysteresis); below it
    /// counts as silence. Silero's rule: `threshold - 0.15`.
    pub neg_threshold: f32,
    /// Audio kept before the detected start and included in the utterance.
    pub prefix_padding: Duration,
    /// Silence that ends an utterance.
    pub min_silence: Duration,
    /// Speech shorter than this is ignored (clicks, coughs); `SpeechStarted` is sent once an
    /// utterance has lasted this long.
    pub min_speech: Duration,
    /// An utterance this long is ended even without a pause.
    pub max_utterance: Duration,
    /// Silence after speech that announces a pause ([`VadEvent::SpeechPaused`]: work on the
    /// utterance may start). Shorter gaps, such as those between words, announce nothing; a
    /// pause as long as `min_silence` is an end, not a pause.
    pub pause: Duration,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self::with_threshold(0.5)
    }
}

impl VadConfig {
    /// The defaults with another threshold (and the matching hysteresis threshold).
    pub fn with_threshold(threshold: f32) -> Self {
        Self {
            threshold,
            neg_threshold: (threshold - 0.15).max(0.01),
            prefix_padding: Duration::from_millis(300),
            min_silence: Duration::from_millis(500),
            min_speech: Duration::from_millis(250),
            max_utterance: Duration::from_secs(30),
            pause: Duration::from_millis(64),
        }
    }

    /// Checks the values make sense; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(format!(
                "VAD threshold must be between 0 and 1, got {}",
                self.threshold
            ));
        }
        if !(self.neg_threshold > 0.0 && self.neg_threshold <= self.threshold) {
            return Err(format!(
                "VAD neg_threshold must be in (0, threshold = {}], got {}",
                self.threshold, self.neg_threshold
            ));
        }
        if self.max_utterance <= self.min_speech {
            return Err(format!(
                "max_utterance ({:?}) must be longer than min_speech ({:?})",
                self.max_utterance, self.min_speech
            ));
        }
        Ok(())
    }
}

/// Utterance boundaries. Times count 16 kHz samples since the stream began (audio time: a gap
/// while a device was being reopened does not advance it).
#[derive(Debug, Clone, PartialEq)]
pub enum VadEvent {
    /// Speech began at `at`. Sent once the speech has lasted `min_speech`.
    SpeechStarted { at: Duration },
    /// Speech that began at `started` ended at `at` (sent once `min_silence` of silence
    /// followed). `audio` is the utterance at 16 kHz mono from `audio_start` (= `started` minus
    /// the prefix padding, where the stream had that much) to `at`.
    SpeechEnded {
        started: Duration,
        at: Duration,
        audio_start: Duration,
        audio: Vec<f32>,
    },
    /// The speech of an announced utterance paused: `pause` of silence followed it (sent only
    /// when `min_silence` is longer than `pause`). The fields are those the
    /// `SpeechEnded` that follows if the silence holds will have, exactly: the utterance so far,
    /// to start work on it before the end is certain.
    SpeechPaused {
        started: Duration,
        at: Duration,
        audio_start: Duration,
        audio: Vec<f32>,
    },
    /// Speech went on after a `SpeechPaused`, before the silence ended the utterance (at `at`,
    /// the start of the window that was speech again).
    SpeechResumed { at: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Silence,
    /// Speech since window `start`; `confirmed` once `SpeechStarted` was sent; `silent_since` is
    /// the first window of the current run of silence, if any; `last_speech` is the window after
    /// the last one at or above the threshold (where the speech ends if the silence holds).
    Speech {
        start: u64,
        /// The start in samples, refined to 10 ms once the utterance is confirmed.
        start_sample: u64,
        confirmed: bool,
        silent_since: Option<u64>,
        last_speech: u64,
    },
}

/// Turns per-window speech probabilities into [`VadEvent`]s (Silero's `VADIterator` rules plus a
/// minimum speech duration and pre-roll).
pub struct Endpointer {
    config: VadConfig,
    phase: Phase,
    /// Windows seen so far.
    windows: u64,
    /// Recent audio: the prefix padding while silent, the whole utterance while speaking.
    audio: VecDeque<f32>,
    /// Sample index of `audio[0]`.
    audio_start: u64,
    /// Where the last utterance ended: a new one never starts before it.
    previous_end: u64,
    min_speech_windows: u64,
    min_silence_windows: u64,
    max_windows: u64,
    pause_windows: u64,
    prefix_samples: u64,
    /// A `SpeechPaused` was sent for the current run of silence.
    paused: bool,
}

fn windows_in(d: Duration) -> u64 {
    (d.as_secs_f64() * f64::from(INPUT_SAMPLE_RATE) / WINDOW as f64).ceil() as u64
}

impl Endpointer {
    pub fn new(config: VadConfig) -> Self {
        Self {
            min_speech_windows: windows_in(config.min_speech).max(1),
            min_silence_windows: windows_in(config.min_silence).max(1),
            max_windows: windows_in(config.max_utterance).max(2),
            pause_windows: windows_in(config.pause).max(1),
            prefix_samples: (config.prefix_padding.as_secs_f64() * f64::from(INPUT_SAMPLE_RATE))
                as u64,
            config,
            phase: Phase::Silence,
            windows: 0,
            audio: VecDeque::new(),
            audio_start: 0,
            previous_end: 0,
            paused: false,
        }
    }

    pub fn config(&self) -> &VadConfig {
        &self.config
    }

    /// True while inside an utterance that has been announced with `SpeechStarted`.
    pub fn in_speech(&self) -> bool {
        matches!(
            self.phase,
            Phase::Speech {
                confirmed: true,
                ..
            }
        )
    }

    /// Audio time at the end of the windows seen so far.
    pub fn now(&self) -> Duration {
        window_time(self.windows)
    }

    /// Takes the next window ([`WINDOW`] samples) and the model's probability for it.
    pub fn push(&mut self, window: &[f32], prob: f32) -> Option<VadEvent> {
        let n = self.windows;
        self.windows += 1;
        self.audio.extend(window);
        let speech = prob >= self.config.threshold;
        let silence = prob < self.config.neg_threshold;
        let mut event = None;
        self.phase = match self.phase {
            Phase::Silence if speech => Phase::Speech {
                start: n,
                start_sample: n * WINDOW as u64,
                confirmed: false,
                silent_since: None,
                last_speech: n + 1,
            },
            Phase::Silence => Phase::Silence,
            Phase::Speech {
                start,
                mut start_sample,
                mut confirmed,
                mut silent_since,
                mut last_speech,
            } => {
                if speech {
                    if silent_since.take().is_some() && std::mem::take(&mut self.paused) {
                        event = Some(VadEvent::SpeechResumed { at: window_time(n) });
                    }
                    last_speech = n + 1;
                } else if silence && silent_since.is_none() {
                    silent_since = Some(n);
                }
                if !confirmed && silent_since.is_none() && n + 1 - start >= self.min_speech_windows
                {
                    confirmed = true;
                    start_sample = self.refine_start(start_sample);
                    event = Some(VadEvent::SpeechStarted {
                        at: frames_to_duration(start_sample, INPUT_SAMPLE_RATE),
                    });
                }
                match silent_since {
                    Some(silent) if n + 1 - silent >= self.min_silence_windows => {
                        // The probability decays over a window or two after the voice stops
                        // (measured on espeak-ng speech: ends came 50-100 ms late when placed at
                        // the first window below neg_threshold); the speech ended after the last
                        // window that was clearly speech.
                        if confirmed {
                            let end = self.refine_end(start_sample, last_speech * WINDOW as u64);
                            event = Some(self.ended(start_sample, end));
                        }
                        Phase::Silence
                    }
                    _ if confirmed && n + 1 - start >= self.max_windows => {
                        event = Some(self.ended(start_sample, (n + 1) * WINDOW as u64));
                        Phase::Silence
                    }
                    _ => {
                        let silent_for = silent_since.map_or(0, |s| n + 1 - s);
                        if confirmed
                            && silent_for == self.pause_windows
                            && self.pause_windows < self.min_silence_windows
                        {
                            // The same end and audio as the `SpeechEnded` if the silence holds
                            // (`last_speech` no longer moves, and the buffer holds all of it).
                            self.paused = true;
                            let end = self.refine_end(start_sample, last_speech * WINDOW as u64);
                            let (audio_start, audio) = self.utterance(start_sample, end);
                            event = Some(VadEvent::SpeechPaused {
                                started: frames_to_duration(start_sample, INPUT_SAMPLE_RATE),
                                at: frames_to_duration(end, INPUT_SAMPLE_RATE),
                                audio_start,
                                audio,
                            });
                        }
                        Phase::Speech {
                            start,
                            start_sample,
                            confirmed,
                            silent_since,
                            last_speech,
                        }
                    }
                }
            }
        };
        if self.phase == Phase::Silence {
            self.paused = false;
            self.trim_to_prefix();
        }
        event
    }

    /// Moves the start of the utterance in progress to `at` (audio time, rounded down to a
    /// window), dropping the audio before it except the prefix padding, and returns the new
    /// start. Nothing changes outside an utterance, or for an `at` before its start or after
    /// now. For the echo gate: an utterance that began as the assistant's own echo and turned
    /// out to contain the user begins where the user did.
    pub fn restart_at(&mut self, at: Duration) -> Option<Duration> {
        let Phase::Speech {
            start,
            start_sample,
            confirmed,
            silent_since,
            last_speech,
        } = self.phase
        else {
            return None;
        };
        let window = (at.as_secs_f64() * f64::from(INPUT_SAMPLE_RATE)) as u64 / WINDOW as u64;
        let window = window.clamp(start, self.windows.saturating_sub(1).max(start));
        let sample = (window * WINDOW as u64).max(start_sample);
        self.phase = Phase::Speech {
            start: window,
            start_sample: sample,
            confirmed,
            silent_since,
            last_speech: last_speech.max(window + 1),
        };
        let keep_from = sample.saturating_sub(self.prefix_samples);
        let drop = (keep_from.saturating_sub(self.audio_start) as usize).min(self.audio.len());
        self.audio.drain(..drop);
        self.audio_start += drop as u64;
        Some(frames_to_duration(sample, INPUT_SAMPLE_RATE))
    }

    /// Ends the stream: an announced utterance still open ends here.
    pub fn finish(&mut self) -> Option<VadEvent> {
        let event = match self.phase {
            Phase::Speech {
                start_sample,
                confirmed: true,
                silent_since,
                last_speech,
                ..
            } => {
                let end = if silent_since.is_some() {
                    self.refine_end(start_sample, last_speech * WINDOW as u64)
                } else {
                    self.windows * WINDOW as u64
                };
                Some(self.ended(start_sample, end))
            }
            _ => None,
        };
        self.phase = Phase::Silence;
        self.paused = false;
        self.trim_to_prefix();
        event
    }

    /// RMS of the 10 ms frame starting at sample `at`, if the buffer holds it.
    fn frame_rms(&self, at: u64) -> Option<f32> {
        let from = at.checked_sub(self.audio_start)? as usize;
        let to = from + REFINE_FRAME as usize;
        if to > self.audio.len() {
            return None;
        }
        let energy: f32 = self.audio.range(from..to).map(|s| s * s).sum();
        Some((energy / REFINE_FRAME as f32).sqrt())
    }

    /// The level below which a 10 ms frame counts as quiet: [`REFINE_FLOOR_DB`] under the
    /// loudest frame of `from..to`, but at least twice (6 dB over) the median level of the
    /// pre-roll before `from`, so background noise never counts as speech.
    fn quiet_floor(&self, from: u64, to: u64) -> f32 {
        let peak = (from..to)
            .step_by(REFINE_FRAME as usize)
            .filter_map(|at| self.frame_rms(at))
            .fold(0.0f32, f32::max);
        let pre_roll = from
            .saturating_sub(self.prefix_samples)
            .max(self.audio_start);
        let mut noise: Vec<f32> = (pre_roll..from.saturating_sub(REFINE_FRAME))
            .step_by(REFINE_FRAME as usize)
            .filter_map(|at| self.frame_rms(at))
            .collect();
        noise.sort_by(f32::total_cmp);
        let noise = noise.get(noise.len() / 2).copied().unwrap_or(0.0);
        (peak * 10f32.powf(REFINE_FLOOR_DB / 20.0)).max(2.0 * noise)
    }

    /// Moves a window-aligned start to the first 10 ms frame that is not quiet, from
    /// [`REFINE_START_WINDOWS`] before it to one window after.
    fn refine_start(&self, start: u64) -> u64 {
        let now = self.audio_start + self.audio.len() as u64;
        let floor = self.quiet_floor(start, now);
        // Frames on a grid anchored at the window start, never reaching back into the previous
        // utterance.
        let earliest = self.audio_start.max(self.previous_end);
        let back = (1..=REFINE_START_WINDOWS * WINDOW as u64 / REFINE_FRAME)
            .map(|k| k * REFINE_FRAME)
            .take_while(|&d| start >= earliest + d)
            .last()
            .unwrap_or(0);
        (start - back..start + WINDOW as u64)
            .step_by(REFINE_FRAME as usize)
            .find(|&at| self.frame_rms(at).is_some_and(|rms| rms > floor))
            .unwrap_or(start)
    }

    /// Moves a window-aligned end back to the end of the last 10 ms frame that is not quiet,
    /// within [`REFINE_END_WINDOWS`] (on espeak-ng speech, ends came 50-100 ms late without this).
    fn refine_end(&self, start: u64, end: u64) -> u64 {
        let floor = self.quiet_floor(start, end);
        let earliest = end
            .saturating_sub(REFINE_END_WINDOWS * WINDOW as u64)
            .max(start + REFINE_FRAME);
        let mut at = end;
        while at >= earliest + REFINE_FRAME {
            if self
                .frame_rms(at - REFINE_FRAME)
                .is_some_and(|rms| rms > floor)
            {
                return at;
            }
            at -= REFINE_FRAME;
        }
        end
    }

    fn ended(&mut self, start_sample: u64, end_sample: u64) -> VadEvent {
        self.previous_end = end_sample;
        let (audio_start, audio) = self.utterance(start_sample, end_sample);
        VadEvent::SpeechEnded {
            started: frames_to_duration(start_sample, INPUT_SAMPLE_RATE),
            at: frames_to_duration(end_sample, INPUT_SAMPLE_RATE),
            audio_start,
            audio,
        }
    }

    /// The audio of an utterance from `start_sample` (less the prefix padding) to `end_sample`,
    /// and where it begins.
    fn utterance(&self, start_sample: u64, end_sample: u64) -> (Duration, Vec<f32>) {
        let from = start_sample
            .saturating_sub(self.prefix_samples)
            .max(self.audio_start);
        let to = end_sample.min(self.audio_start + self.audio.len() as u64);
        let audio = self
            .audio
            .range((from - self.audio_start) as usize..(to.max(from) - self.audio_start) as usize)
            .copied()
            .collect();
        (frames_to_duration(from, INPUT_SAMPLE_RATE), audio)
    }

    fn trim_to_prefix(&mut self) {
        // The prefix, plus the windows a refined start may move back into.
        let keep = (self.prefix_samples + REFINE_START_WINDOWS * WINDOW as u64) as usize;
        if self.audio.len() > keep {
            let drop = self.audio.len() - keep;
            self.audio.drain(..drop);
            self.audio_start += drop as u64;
        }
    }
}

fn window_time(windows: u64) -> Duration {
    frames_to_duration(windows * WINDOW as u64, INPUT_SAMPLE_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a probability per window and collects events. A window is filled with its index
    /// where the probability says speech, with zeros where it says silence, so the boundary
    /// refinement agrees with the probabilities.
    fn run(config: VadConfig, probs: &[f32]) -> Vec<VadEvent> {
        run_all(config, probs)
            .into_iter()
            .filter(|e| {
                !matches!(
                    e,
                    VadEvent::SpeechPaused { .. } | VadEvent::SpeechResumed { .. }
                )
            })
            .collect()
    }

    /// As `run`, with the pauses.
    fn run_all(config: VadConfig, probs: &[f32]) -> Vec<VadEvent> {
        let mut endpointer = Endpointer::new(config);
        let mut events = Vec::new();
        for (i, &p) in probs.iter().enumerate() {
            let level = if p >= 0.35 { (i + 1) as f32 } else { 0.0 };
            let window = vec![level; WINDOW];
            events.extend(endpointer.push(&window, p));
        }
        events.extend(endpointer.finish());
        events
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn pattern(parts: &[(usize, f32)]) -> Vec<f32> {
        parts
            .iter()
            .flat_map(|&(n, p)| std::iter::repeat_n(p, n))
            .collect()
    }

    #[test]
    fn one_utterance_with_boundaries_and_preroll() {
        // 20 windows silence, 30 speech, 20 silence (32 ms windows).
        let probs = pattern(&[(20, 0.05), (30, 0.9), (20, 0.05)]);
        let events = run(VadConfig::default(), &probs);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0], VadEvent::SpeechStarted { at: ms(20 * 32) });
        let VadEvent::SpeechEnded {
            started,
            at,
            audio_start,
            audio,
        } = &events[1]
        else {
            panic!("{events:?}")
        };
        assert_eq!(*started, ms(640));
        assert_eq!(*at, ms(50 * 32));
        // 300 ms pre-roll = 4800 samples, from window 10.625.
        assert_eq!(*audio_start, ms(640 - 300));
        assert_eq!(audio.len(), 4800 + 30 * WINDOW);
        assert_eq!(audio[0], 0.0);
        assert_eq!(audio[4799], 0.0);
        assert_eq!(audio[4800], 21.0);
        assert_eq!(*audio.last().unwrap(), 50.0);
    }

    #[test]
    fn an_utterance_can_be_restarted_later() {
        // Speech from window 20 on; at window 60 the start moves to window 50: the utterance
        // keeps 300 ms of pre-roll before that and nothing earlier.
        let mut endpointer = Endpointer::new(VadConfig::default());
        assert_eq!(endpointer.restart_at(ms(0)), None, "not in an utterance");
        let mut events = Vec::new();
        for i in 0..100usize {
            let p = if (20..70).contains(&i) { 0.9 } else { 0.05 };
            let level = if p > 0.5 { (i + 1) as f32 } else { 0.0 };
            events.extend(endpointer.push(&vec![level; WINDOW], p));
            if i == 60 {
                assert_eq!(endpointer.restart_at(ms(50 * 32 + 5)), Some(ms(50 * 32)));
                // Not before the start, not after now.
                assert_eq!(endpointer.restart_at(ms(0)), Some(ms(50 * 32)));
            }
        }
        let Some(VadEvent::SpeechEnded {
            started,
            audio_start,
            audio,
            ..
        }) = events.last()
        else {
            panic!("{events:?}")
        };
        assert_eq!(*started, ms(50 * 32));
        assert_eq!(*audio_start, ms(50 * 32 - 300));
        assert_eq!(audio[4800], 51.0);
    }

    #[test]
    fn boundaries_are_refined_to_the_audio_energy() {
        // Speech energy from sample 10 * 512 + 200 to 40 * 512 + 100; the probabilities lag:
        // high from window 10 to 42 (two windows after the voice stopped).
        let speech = (10 * WINDOW + 200)..(40 * WINDOW + 100);
        let mut endpointer = Endpointer::new(VadConfig::default());
        let mut events = Vec::new();
        for w in 0..70 {
            let window: Vec<f32> = (w * WINDOW..(w + 1) * WINDOW)
                .map(|i| if speech.contains(&i) { 0.5 } else { 0.0 })
                .collect();
            let p = if (10..43).contains(&w) { 0.9 } else { 0.0 };
            events.extend(endpointer.push(&window, p));
        }
        let VadEvent::SpeechEnded { started, at, .. } = &events[2] else {
            panic!("{} events", events.len())
        };
        // The pause announced the same boundaries.
        assert!(
            matches!(&events[1], VadEvent::SpeechPaused { started: s, at: a, .. } if s == started && a == at),
            "the pause's boundaries"
        );
        // Refined on a 10 ms grid anchored at the window boundaries: the start moves to the
        // first frame holding speech (the second frame of window 10), the end to the end of the
        // last frame holding speech.
        let start = *started;
        let end = *at;
        assert_eq!(
            start,
            frames_to_duration(10 * WINDOW as u64 + 160, INPUT_SAMPLE_RATE)
        );
        assert!(
            end >= frames_to_duration(40 * 512 + 100, 16_000)
                && end <= frames_to_duration(40 * 512 + 100 + 160, 16_000),
            "end {end:?}"
        );
        assert_eq!(events[0], VadEvent::SpeechStarted { at: start });
    }

    #[test]
    fn short_blips_and_short_pauses() {
        // A 5-window blip (160 ms < 250 ms) is ignored.
        let events = run(
            VadConfig::default(),
            &pattern(&[(10, 0.0), (5, 0.9), (30, 0.0)]),
        );
        assert!(events.is_empty(), "{events:?}");

        // A 10-window pause (320 ms < 500 ms) inside speech does not split it.
        let probs = pattern(&[(10, 0.0), (20, 0.9), (10, 0.1), (20, 0.9), (30, 0.0)]);
        let events = run(VadConfig::default(), &probs);
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(events[1], VadEvent::SpeechEnded { at, .. } if at == ms(60 * 32)));
    }

    #[test]
    fn hysteresis_keeps_speech_between_thresholds() {
        // 0.4 is below the threshold (0.5) but above neg_threshold (0.35): 640 ms of it is not
        // the 500 ms of silence that would end the utterance. The end is placed after the last
        // window at or above the threshold.
        let probs = pattern(&[
            (5, 0.0),
            (10, 0.9),
            (20, 0.4),
            (10, 0.9),
            (10, 0.4),
            (20, 0.0),
        ]);
        let events = run(VadConfig::default(), &probs);
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(
            matches!(events[1], VadEvent::SpeechEnded { started, at, .. } if started == ms(5 * 32) && at == ms(45 * 32)),
            "{events:?}"
        );
    }

    #[test]
    fn long_speech_is_cut_at_max_utterance_and_stream_end_closes_speech() {
        let config = VadConfig {
            max_utterance: Duration::from_secs(1),
            ..VadConfig::default()
        };
        let events = run(config, &pattern(&[(100, 0.9)]));
        let ends: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                VadEvent::SpeechEnded { started, at, .. } => Some((*started, *at)),
                _ => None,
            })
            .collect();
        // 1 s = 31.25 → 32 windows per cut. The last 4 windows (128 ms) are shorter than
        // min_speech, so `finish` has no announced utterance to close.
        assert_eq!(
            ends,
            vec![
                (ms(0), ms(1024)),
                (ms(1024), ms(2048)),
                (ms(2048), ms(3072))
            ]
        );

        // Speech still open at the end of the stream is closed by `finish`.
        let events = run(VadConfig::default(), &pattern(&[(3, 0.0), (20, 0.9)]));
        assert!(
            matches!(events.last(), Some(VadEvent::SpeechEnded { at, .. }) if *at == ms(23 * 32)),
            "{events:?}"
        );
    }

    #[test]
    fn config_is_validated() {
        assert!(VadConfig::default().validate().is_ok());
        assert!(VadConfig::with_threshold(1.5).validate().is_err());
        assert!(VadConfig::with_threshold(0.0).validate().is_err());
    }

    #[test]
    fn missing_assets_are_named_with_the_fix() {
        let empty = std::env::temp_dir().join("audio-io-no-assets");
        let err = VadAssets::locate_in(None, None, &[empty])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ONNX Runtime library"), "{err}");
        assert!(err.contains("Silero VAD model"), "{err}");
        assert!(err.contains("tools/fetch_vad.sh"), "{err}");

        let err = VadAssets::locate_in(Some("/nonexistent/libonnxruntime.so".into()), None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("LFM2D_ORT_LIB=/nonexistent/libonnxruntime.so does not exist"),
            "{err}"
        );
    }

    /// A pause announces the utterance so far, exactly as the end that follows if the silence
    /// holds; speech within the silence resumes it, and the next pause announces the longer one.
    #[test]
    fn a_pause_announces_the_end_the_silence_will_confirm() {
        // Speech, a 6-window pause (shorter than the 500 ms silence), speech, then silence.
        let probs = pattern(&[(10, 0.05), (20, 0.9), (6, 0.05), (10, 0.9), (25, 0.05)]);
        let events = run_all(VadConfig::default(), &probs);
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| match e {
                VadEvent::SpeechStarted { .. } => "started",
                VadEvent::SpeechPaused { .. } => "paused",
                VadEvent::SpeechResumed { .. } => "resumed",
                VadEvent::SpeechEnded { .. } => "ended",
            })
            .collect();
        assert_eq!(kinds, ["started", "paused", "resumed", "paused", "ended"]);
        assert_eq!(events[2], VadEvent::SpeechResumed { at: ms(36 * 32) });
        let (
            VadEvent::SpeechPaused {
                started: ps,
                at: pa,
                audio_start: pst,
                audio: paudio,
            },
            VadEvent::SpeechEnded {
                started,
                at,
                audio_start,
                audio,
            },
        ) = (&events[3], &events[4])
        else {
            panic!("{events:?}");
        };
        assert_eq!((ps, pa, pst), (started, at, audio_start));
        assert_eq!(paudio, audio, "the same utterance");
        assert_eq!(*at, ms(46 * 32));
        // The first pause held the utterance up to its own end.
        let VadEvent::SpeechPaused { at, audio, .. } = &events[1] else {
            panic!("{events:?}");
        };
        assert_eq!(*at, ms(30 * 32));
        assert!(audio.len() < paudio.len());
    }

    /// Gaps shorter than `pause` (between words) announce nothing; the pause is announced once
    /// the silence has lasted `pause`.
    #[test]
    fn short_gaps_announce_no_pause() {
        // Speech, a 1-window gap (32 ms < the 64 ms pause), speech, then silence.
        let probs = pattern(&[(10, 0.05), (20, 0.9), (1, 0.05), (10, 0.9), (25, 0.05)]);
        let mut endpointer = Endpointer::new(VadConfig::default());
        let mut seen = Vec::new();
        for (i, &p) in probs.iter().enumerate() {
            let window = vec![if p >= 0.35 { 1.0 } else { 0.0 }; WINDOW];
            if let Some(e) = endpointer.push(&window, p) {
                seen.push((i, e));
            }
        }
        let kinds: Vec<(usize, &str)> = seen
            .iter()
            .map(|(i, e)| {
                let kind = match e {
                    VadEvent::SpeechStarted { .. } => "started",
                    VadEvent::SpeechPaused { .. } => "paused",
                    VadEvent::SpeechResumed { .. } => "resumed",
                    VadEvent::SpeechEnded { .. } => "ended",
                };
                (*i, kind)
            })
            .collect();
        // The speech ends at window 41; the pause is announced after its second silent window.
        assert_eq!(kinds[1..], [(42, "paused"), (56, "ended")], "{kinds:?}");
    }
}
