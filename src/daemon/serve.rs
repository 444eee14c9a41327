//! `lfm2d serve`: the daemon. In its default mode it is the voice assistant: microphone → echo
//! canceller → VAD → user turn → interleaved generation → streaming detokenizer → speaker,
//! continuously, over many turns, with barge-in and tool calls. The other modes reuse the same
//! pieces: live transcription, live translation, and reading text aloud.
//!
//! Threads: the capture pump (audio-io's `Listener`), the engine (the model, `crate::engine`),
//! and this loop, which runs the turn state machine, feeds the player, and prints the
//! conversation.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use audio_io::echo::{EchoCanceller, EchoConfig, EchoMode, EchoReference};
use audio_io::vad::{SileroVad, VadAssets, VadConfig, VadEvent};
use audio_io::{
    DeviceCapture, DevicePlayback, DeviceSelector, ListenEvent, Listener, ListenerConfig, Playback,
    PLAYBACK_SOURCE_RATE,
};
use crossbeam_channel::{select, Receiver};
use dialog::turn::{Action, Event, TurnManager};
use lfm2_audio::generate::GenerationParams;
use lfm2_audio::sampling::SamplingParams;

use crate::cmd::runtime::{Quant, RuntimeArgs};
use crate::cmd::speech::CodecArg;
use crate::config::Config;
use crate::engine::{
    self, Content, ConvEvent, Conversation, EngineHandle, EngineOptions, Output, Respond, Setup,
    ToolPolicy,
};

/// What the daemon does.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Spoken conversation (the default).
    Assistant,
    /// Live transcription: every utterance, timestamped, to stdout (and a file).
    Transcribe,
    /// Every utterance translated (`--to LANG`), printed and optionally spoken.
    Translate,
    /// Read lines of stdin aloud with a voice preset.
    Speak,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Configuration file (see config/lfm2d.toml); flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub quant: Option<Quant>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// What to do (assistant, transcribe, translate, speak).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Target language of the translate mode.
    #[arg(long)]
    pub to: Option<String>,
    /// Speak the translations too (translate mode).
    #[arg(long)]
    pub speak: bool,
    /// Also write transcripts and translations to this file.
    #[arg(long)]
    pub transcript: Option<PathBuf>,
    /// Voice preset of the speak mode and of spoken translations.
    #[arg(long)]
    pub voice: Option<String>,
    /// Input device (name or index).
    #[arg(long)]
    pub input: Option<String>,
    /// Output device (name or index).
    #[arg(long)]
    pub output: Option<String>,
    /// Echo handling: cancel, gate, half-duplex or off.
    #[arg(long)]
    pub echo: Option<EchoMode>,
    /// Never interrupt the assistant (the same as `--echo half-duplex`).
    #[arg(long)]
    pub half_duplex: bool,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Positions the conversation may hold before its oldest turns are dropped (default: the
    /// model's context).
    #[arg(long)]
    pub context_limit: Option<usize>,
    /// Stop after this many replies (for scripted use and tests).
    #[arg(long)]
    pub max_turns: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Serve the OpenAI-Realtime-compatible WebSocket API at ws://ADDR/v1/realtime instead of
    /// using the microphone and speaker (only the API server runs; no sound devices are opened).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// API key Realtime clients must send (`Authorization: Bearer KEY`); required when --listen
    /// is not a loopback address.
    #[arg(long, env = "LFM2D_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve the Wyoming protocol for Home Assistant at tcp://HOST:PORT (port 10300 by default):
    /// speech to text, text to speech and a conversation agent (with --listen too: one model).
    #[arg(long, value_name = "URI")]
    pub wyoming: Option<String>,
    /// Do not announce the Wyoming server on the local network (mDNS).
    #[arg(long)]
    pub no_zeroconf: bool,
}

/// The model and its audio decoder, as the configuration and the flags choose them.
pub(crate) struct Loaded {
    pub dir: PathBuf,
    pub quant: Quant,
    pub model: Arc<lfm2_audio::model::Lfm2AudioModel>,
    pub detok: Box<dyn codec::Detokenizer>,
}

pub(crate) fn load(args: &Args, cfg: &Config) -> anyhow::Result<Loaded> {
    let model_dir = cfg
        .model_dir()
        .map_or_else(crate::model_cache::default_model_dir, Ok)?;
    // The configuration was validated against the preset names.
    let quant = args
        .quant
        .unwrap_or(Quant::from_name(&cfg.model.quant).unwrap_or(Quant::Q4));
    let threads = args
        .threads
        .or((cfg.model.threads > 0).then_some(cfg.model.threads));
    let runtime = RuntimeArgs { quant, threads };
    let model = Arc::new(runtime.load(&model_dir)?);
    let codec = match cfg.model.codec.as_str() {
        "lfm2" => CodecArg::Lfm2,
        "mimi" => CodecArg::Mimi,
        _ => CodecArg::Auto,
    };
    let detok = codec::open_detokenizer_with(&model_dir, codec.into(), &model.plan)
        .context("loading the audio decoder")?;
    Ok(Loaded {
        dir: model_dir,
        quant,
        model,
        detok,
    })
}

/// Whether stdout is in the middle of a line (the assistant's words as they stream).
static OPEN_LINE: AtomicBool = AtomicBool::new(false);

/// Ends the line the assistant's streamed words are on, if one is open: every other line of
/// the log starts on a line of its own.
fn end_open_line() {
    if OPEN_LINE.swap(false, Ordering::Relaxed) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out);
        let _ = out.flush();
    }
}

/// Seconds since the daemon started, for the log (every line of the log is stamped with it,
/// and starts on a line of its own).
fn stamp(start: Instant) -> String {
    end_open_line();
    format!("[{:>8.2}s]", start.elapsed().as_secs_f64())
}

/// The uptime (seconds, the clock of [`stamp`]) at which the microphone captured audio time
/// `t`, given a VAD event decided at audio time `decided` and sent `latency` after that
/// sample's capture.
fn uptime_of(start: Instant, t: Duration, decided: Duration, latency: Duration) -> f64 {
    start.elapsed().as_secs_f64() - latency.as_secs_f64() - decided.saturating_sub(t).as_secs_f64()
}

/// A diagnostic line (stderr).
fn log(line: String) {
    end_open_line();
    eprintln!("{line}");
}

/// Everything `run` resolved from the configuration and the flags.
struct Resolved {
    cfg: Config,
    mode: Mode,
    echo: EchoMode,
    start: Instant,
}

/// The configuration file (or the defaults) with the flags applied.
pub(crate) fn configured(args: &Args) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(m) = &args.model {
        cfg.model.dir = m.display().to_string();
    }
    if let Some(s) = &args.system {
        cfg.assistant.system_prompt = s.clone();
    }
    if let Some(to) = &args.to {
        cfg.assistant.translate_to = to.clone();
    }
    if args.speak {
        cfg.assistant.speak_translation = true;
    }
    if let Some(v) = &args.voice {
        cfg.assistant.voice = v.clone();
    }
    if let Some(t) = &args.transcript {
        cfg.assistant.transcript_file = t.display().to_string();
    }
    if let Some(n) = args.context_limit {
        cfg.assistant.context_limit = n;
    }
    Ok(cfg)
}

fn resolve(args: &Args) -> anyhow::Result<Resolved> {
    let cfg = configured(args)?;
    let mode = match args.mode {
        Some(m) => m,
        None => cfg.assistant.mode.parse().map_err(anyhow::Error::msg)?,
    };
    anyhow::ensure!(
        mode != Mode::Translate || !cfg.assistant.translate_to.trim().is_empty(),
        "translate mode needs a target language: --to LANG (or assistant.translate_to)"
    );
    let echo = if args.half_duplex {
        EchoMode::HalfDuplex
    } else {
        match args.echo {
            Some(e) => e,
            None => cfg.echo.mode.parse().map_err(anyhow::Error::msg)?,
        }
    };
    Ok(Resolved {
        cfg,
        mode,
        echo,
        start: Instant::now(),
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // From here on SIGINT and SIGTERM stop the daemon cleanly (see `shutdown`).
    let stop = super::shutdown::install()?;
    if let Some(address) = crate::wyoming::wanted(&args)? {
        return crate::wyoming::run(&args, &address, args.listen.as_deref(), &stop);
    }
    if let Some(listen) = &args.listen {
        return crate::realtime::run(&args, listen, &stop);
    }
    let r = resolve(&args)?;
    let cfg = &r.cfg;
    let Loaded {
        dir: model_dir,
        quant,
        model,
        detok,
    } = load(&args, cfg)?;
    eprintln!(
        "{} model loaded from {} ({quant:?}), mode {:?}",
        stamp(r.start),
        model_dir.display(),
        r.mode
    );
    let (engine, engine_thread) = engine::spawn_with(model, detok, engine_options(cfg))?;
    super::shutdown::running();
    let result = match r.mode {
        Mode::Assistant => assistant(&args, &r, &engine, &stop),
        Mode::Transcribe | Mode::Translate => transcribe_or_translate(&args, &r, &engine, &stop),
        Mode::Speak => speak(&args, &r, &engine, &stop),
    };
    engine.shutdown();
    super::shutdown::join(engine_thread, "the engine");
    result
}

/// The name of a signal, for the log.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    super::shutdown::name(sig)
}

/// The engine's options as the configuration sets them (every front end starts one engine).
pub(crate) fn engine_options(cfg: &Config) -> EngineOptions {
    EngineOptions {
        context_limit: (cfg.assistant.context_limit > 0).then_some(cfg.assistant.context_limit),
    }
}

pub(crate) fn sampling(cfg: &Config) -> GenerationParams {
    let opt = |v: f32| (v > 0.0).then_some(v);
    GenerationParams {
        max_new_tokens: cfg.assistant.max_reply_tokens,
        text: SamplingParams::new(
            opt(cfg.sampling.text_temperature),
            (cfg.sampling.text_top_k > 0).then_some(cfg.sampling.text_top_k),
        ),
        audio: SamplingParams::new(
            opt(cfg.sampling.audio_temperature),
            (cfg.sampling.audio_top_k > 0).then_some(cfg.sampling.audio_top_k),
        ),
        seed: cfg.sampling.seed,
    }
}

fn device(flag: Option<&str>, configured: &str) -> anyhow::Result<DeviceSelector> {
    flag.unwrap_or(configured)
        .parse()
        .map_err(anyhow::Error::msg)
}

/// The microphone, through the echo canceller (unless off), to the VAD.
fn listen(args: &Args, r: &Resolved, reference: Option<EchoReference>) -> anyhow::Result<Listener> {
    let cfg = &r.cfg;
    let vad_cfg = VadConfig {
        prefix_padding: Duration::from_millis(cfg.vad.prefix_padding_ms),
        min_silence: Duration::from_millis(cfg.vad.silence_duration_ms),
        min_speech: Duration::from_millis(cfg.vad.min_speech_ms),
        ..VadConfig::with_threshold(cfg.vad.threshold)
    };
    vad_cfg.validate().map_err(anyhow::Error::msg)?;
    let vad = SileroVad::load(&VadAssets::locate()?)?;
    let capture = DeviceCapture::open(&device(args.input.as_deref(), &cfg.audio.input)?)?;
    let config = ListenerConfig {
        vad: vad_cfg,
        levels: false,
        tap_audio: false,
    };
    Ok(match reference {
        Some(reference) => {
            let canceller = EchoCanceller::new(
                EchoConfig {
                    mode: r.echo,
                    ..EchoConfig::default()
                },
                reference,
            );
            Listener::start_with_echo(Box::new(capture), vad, config, canceller)?
        }
        None => Listener::start(Box::new(capture), vad, config)?,
    })
}

/// The speaker: audio waits in a queue and goes to the device at most [`Player::LEAD`] ahead of
/// what has been heard, so that writing never blocks the loop and a barge-in has little to throw
/// away. Every chunk written is also the echo canceller's reference.
///
/// Pacing: the model delivers a reply in bursts (in interleaved generation, twelve frames of
/// speech, then six text steps without any). A reply that started to play with its first frame
/// would run dry in every pause the burst before it did not cover. So the start of a reply is
/// held back by the delay its predecessors needed to play without a hole ([`Pacing`]), and a
/// reply that runs dry anyway (generation slower than real time) pauses once until a second of
/// speech is buffered, rather than stuttering: both are logged.
struct Player {
    playback: DevicePlayback,
    reference: Option<EchoReference>,
    pending: VecDeque<f32>,
    /// Samples written since the device opened, less those a barge-in dropped: `written -
    /// played()` is what the device still has to play.
    written: u64,
    finished: bool,
    pace: Pacing,
    /// Since when the device has had nothing to play.
    idle_since: Option<Instant>,
}

/// The start delay of replies, learnt from the replies so far.
struct Pacing {
    /// Seconds a reply waits after its first audio arrived before it starts to play.
    lead: f64,
    /// The reply being received: when its first audio came, its samples so far, and the delay
    /// it would have needed to play through without a hole (the largest `arrival - first -
    /// audio before it / rate`).
    first: Option<Instant>,
    last: Option<Instant>,
    received: u64,
    needed: f64,
    /// Not writing to the device: the reply waits for its lead (or, after running dry, for
    /// [`Pacing::REBUFFER`] of speech).
    holding: bool,
    rebuffering: Option<Instant>,
    /// Pauses of the current reply to let generation catch up, and their total time.
    pauses: u32,
    paused: Duration,
    /// The device's counters when the reply began (underruns are reported per reply).
    stats: audio_io::StreamStats,
}

impl Pacing {
    /// The lead of the first reply, before anything was measured.
    const FIRST_LEAD: f64 = 0.12;
    /// Added to what the replies so far needed (scheduling jitter, a device period).
    const MARGIN: f64 = 0.06;
    const MAX_LEAD: f64 = 3.0;
    /// Speech buffered before a reply that ran dry goes on.
    const REBUFFER: u64 = 24_000;

    fn new() -> Self {
        Self {
            lead: Self::FIRST_LEAD,
            first: None,
            last: None,
            received: 0,
            needed: 0.0,
            holding: false,
            rebuffering: None,
            pauses: 0,
            paused: Duration::ZERO,
            stats: audio_io::StreamStats::default(),
        }
    }

    /// Generated speech per second of generating, once there is enough to tell.
    fn rate(&self) -> Option<f64> {
        let span = self.last?.duration_since(self.first?).as_secs_f64();
        (span > 1.0).then(|| self.received as f64 / 24_000.0 / span)
    }
}

impl Player {
    /// 0.4 s at 24 kHz.
    const LEAD: u64 = 24_000 * 2 / 5;
    /// Idle time after which the device is paused.
    const SUSPEND_AFTER: Duration = Duration::from_millis(500);
    /// What the device's resampler may hold back (20 ms): a backlog this small is none.
    const HELD: u64 = 480;

    fn open(sel: &DeviceSelector, reference: Option<EchoReference>) -> anyhow::Result<Self> {
        Ok(Self {
            playback: DevicePlayback::open(sel, PLAYBACK_SOURCE_RATE)?,
            reference,
            pending: VecDeque::new(),
            written: 0,
            finished: true,
            pace: Pacing::new(),
            idle_since: None,
        })
    }

    fn queue(&mut self, samples: &[f32]) {
        self.pending.extend(samples);
        self.finished = false;
    }

    /// A reply begins: its audio is held back by the learnt lead.
    fn begin_reply(&mut self) {
        let lead = self.pace.lead;
        self.pace = Pacing {
            lead,
            holding: true,
            stats: self.playback.stats(),
            ..Pacing::new()
        };
    }

    /// Audio of the current reply arrived from the engine.
    fn reply_audio(&mut self, samples: &[f32]) {
        let now = Instant::now();
        let p = &mut self.pace;
        let first = *p.first.get_or_insert(now);
        let due = p.received as f64 / 24_000.0;
        p.needed = p.needed.max(now.duration_since(first).as_secs_f64() - due);
        p.last = Some(now);
        p.received += samples.len() as u64;
        self.queue(samples);
    }

    /// The current reply is over (played out, or cut): learns the lead for the next one and
    /// returns what to log about how it played.
    fn end_reply(&mut self) -> String {
        let p = &mut self.pace;
        p.holding = false;
        p.rebuffering = None;
        let mut notes = Vec::new();
        let stats = self.playback.stats();
        // Underruns of our queue (nothing to play while the reply went on), and those the
        // driver reported (the device was not fed in time: a loaded machine).
        let underruns = stats.xruns.saturating_sub(p.stats.xruns);
        let driver = stats.device_xruns.saturating_sub(p.stats.device_xruns);
        let rate = self
            .playback
            .device_format()
            .map_or(48_000, |f| f.sample_rate);
        let silent = stats.xrun_frames.saturating_sub(p.stats.xrun_frames) as f64 / f64::from(rate);
        notes.push(match (underruns, driver) {
            (0, 0) => "no underrun".to_string(),
            (0, d) => format!("no underrun of the queue, {d} of the driver"),
            (u, d) => format!(
                "{u} underruns ({:.0} ms of silence), {d} of the driver",
                silent * 1e3
            ),
        });
        if p.pauses > 0 {
            notes.push(format!(
                "{} pauses ({:.0} ms) to let generation catch up",
                p.pauses,
                p.paused.as_secs_f64() * 1e3
            ));
        }
        if let Some(rate) = p.rate() {
            notes.push(format!("generated at {rate:.2}x real time"));
            if rate < 1.0 {
                notes.push("generation is slower than real time: later replies start later".into());
            }
        }
        if p.first.is_some() {
            // Rise at once to what this reply needed; come down slowly.
            let want = (p.needed + Pacing::MARGIN).min(Pacing::MAX_LEAD);
            p.lead = if want > p.lead {
                want
            } else {
                0.8 * p.lead + 0.2 * want
            };
            notes.push(format!("next lead {:.0} ms", p.lead * 1e3));
        }
        p.first = None;
        notes.join(", ")
    }

    /// Samples the device has played since it opened.
    fn played(&self) -> u64 {
        self.playback.played()
    }

    /// Whether the hold on the current reply is over. `done`: everything was generated.
    fn release(&mut self, done: bool, start: Instant) -> bool {
        let p = &mut self.pace;
        if !p.holding {
            return true;
        }
        let now = Instant::now();
        let ready = match (p.rebuffering, p.first) {
            _ if done => true,
            (Some(since), _) => {
                let go = self.pending.len() as u64 >= Pacing::REBUFFER;
                if go {
                    p.pauses += 1;
                    p.paused += now.duration_since(since);
                }
                go
            }
            (None, Some(first)) => {
                now.duration_since(first).as_secs_f64() >= p.lead
                    || self.pending.len() as f64 >= (p.lead + 1.0) * 24_000.0
            }
            (None, None) => false,
        };
        if ready {
            if p.rebuffering.take().is_some() {
                log(format!(
                    "{} playback resumes: generation had fallen behind real time",
                    stamp(start)
                ));
            }
            p.holding = false;
        }
        ready
    }

    /// Moves queued audio to the device; once the queue is empty and `done`, lets the device
    /// play out what it holds.
    fn pump(&mut self, done: bool, start: Instant) {
        let played = self.played();
        // A device that played past what it was given (a barge-in dropped the rest).
        self.written = self.written.max(played);
        if !self.pace.holding
            && !done
            && self.pace.first.is_some()
            && self.written <= played + Self::HELD
            && self.pending.is_empty()
            && self.pace.rebuffering.is_none()
        {
            // The reply ran dry while more is coming: wait for a good stretch rather than
            // playing every frame as it comes.
            self.pace.holding = true;
            self.pace.rebuffering = Some(Instant::now());
            log(format!(
                "{} playback ran dry: generation is behind real time; buffering {:.1} s",
                stamp(start),
                Pacing::REBUFFER as f64 / 24_000.0
            ));
        }
        if !self.release(done, start) {
            if let Some(r) = &self.reference {
                r.observe(played);
            }
            return;
        }
        while !self.pending.is_empty() && self.written.saturating_sub(self.played()) < Self::LEAD {
            let n = self.pending.len().min(1920);
            let chunk: Vec<f32> = self.pending.drain(..n).collect();
            if let Err(e) = self.playback.write(&chunk) {
                log(format!("{} playback: {e}", stamp(start)));
            }
            if let Some(r) = &self.reference {
                r.push(&chunk, self.played());
            }
            self.written += n as u64;
        }
        if done && self.pending.is_empty() && !self.finished {
            self.finished = true;
            if let Err(e) = self.playback.finish() {
                log(format!("{} playback: {e}", stamp(start)));
            }
            if let Some(r) = &self.reference {
                r.finish();
            }
        } else if let Some(r) = &self.reference {
            r.observe(self.played());
        }
        // A speaker with nothing to play for a while is paused: listening costs less.
        if self.pending.is_empty() && self.finished && self.playback.wait_idle(Duration::ZERO) {
            let since = *self.idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Self::SUSPEND_AFTER {
                self.playback.suspend();
            }
        } else {
            self.idle_since = None;
        }
    }

    /// Whether everything queued has been played.
    fn idle(&mut self) -> bool {
        self.pending.is_empty()
            && (self.finished || self.written == 0)
            && self.playback.wait_idle(Duration::ZERO)
    }

    /// Drops everything queued and not yet played (barge-in).
    fn clear(&mut self) {
        self.pending.clear();
        self.playback.clear();
        // What was dropped will never be played: the device's backlog is nothing again. (Not
        // taking it off kept the lead full of audio that never plays: mute after a barge-in.)
        let played = self.played();
        self.written = played;
        self.finished = true;
        self.pace.holding = false;
        self.pace.rebuffering = None;
        if let Some(r) = &self.reference {
            r.clear(played);
        }
    }

    fn close(mut self) {
        self.finished = false;
        let _ = self.playback.finish();
    }
}

/// A short two-tone chime (24 kHz) for timers.
fn chime() -> Vec<f32> {
    let mut out = Vec::new();
    for (f, n) in [(880.0f32, 4800), (1320.0, 7200)] {
        for i in 0..n {
            let t = i as f32 / 24_000.0;
            let env = (1.0 - i as f32 / n as f32).min(i as f32 / 240.0);
            out.push(0.25 * env * (2.0 * std::f32::consts::PI * f * t).sin());
        }
    }
    out
}

/// The assistant's tools: the built-ins and the configured ones.
fn tools(cfg: &Config) -> Vec<dialog::tools::ToolSpec> {
    let mut tools = if cfg.assistant.builtin_tools {
        dialog::tools::built_in()
    } else {
        Vec::new()
    };
    tools.extend(cfg.tools.iter().cloned());
    tools
}

fn assistant(
    args: &Args,
    r: &Resolved,
    engine: &EngineHandle,
    stop: &Receiver<i32>,
) -> anyhow::Result<()> {
    let (cfg, start) = (&r.cfg, r.start);
    let conv = engine.open(Setup {
        instructions: cfg.assistant.system_prompt.clone(),
        tools: tools(cfg),
        tool_policy: ToolPolicy::Run {
            max_rounds: cfg.assistant.max_tool_rounds,
        },
        params: sampling(cfg),
        output: Output::Speech,
    })?;
    let reference = match r.echo {
        EchoMode::Off => None,
        _ => Some(EchoReference::new(PLAYBACK_SOURCE_RATE)?),
    };
    let listener = listen(args, r, reference.clone())?;
    let mut player = Player::open(
        &device(args.output.as_deref(), &cfg.audio.output)?,
        reference,
    )?;
    let mut turns = TurnManager::new(r.echo == EchoMode::HalfDuplex);
    turns.handle(Event::Start);
    eprintln!(
        "{} listening, echo handling {} (say something; Ctrl-C to stop)",
        stamp(start),
        r.echo
    );

    // The reply in progress, the one that was interrupted (its late events are dropped), and
    // where the reply began in the player's sample count.
    let mut current: Option<String> = None;
    let mut cancelled: Option<String> = None;
    let mut reply_base: Option<u64> = None;
    let mut reply_done = false;
    let mut replies = 0u64;
    let mut barge_ins = 0u64;
    let mut user_turns = 0u64;
    let mut last_user: Option<(String, Vec<f32>)> = None;
    let mut spoke_at: Option<Instant> = None;
    // Uptime of the last voiced sample of the utterance being answered, until the answer's
    // first sample has been played; and the delays measured so far.
    let mut question_end: Option<f64> = None;
    let mut pending_end: Option<f64> = None;
    let mut delays: Vec<f64> = Vec::new();
    let mut tool_round = false;
    let mut heard_at_stop: Option<u64> = None;
    let mut current_item: Option<String> = None;
    let mut signal: Option<i32> = None;
    // Transcripts asked for and not yet received.
    let mut transcripts = 0u32;
    let deadline = args
        .seconds
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let stdout = std::io::stdout();
    let say = |line: String| {
        end_open_line();
        let mut out = stdout.lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    loop {
        let mut actions = Vec::new();
        select! {
            recv(stop) -> sig => {
                signal = Some(sig.unwrap_or(0));
                break;
            }
            recv(listener.events()) -> ev => match ev {
                Ok(ListenEvent::Vad { event: VadEvent::SpeechStarted { at }, decided, latency }) => {
                    say(format!(
                        "{} user: (speaking since {:.2}s)",
                        stamp(start),
                        uptime_of(start, at, decided, latency)
                    ));
                    actions = turns.handle(Event::SpeechStarted { at });
                }
                Ok(ListenEvent::Vad { event: VadEvent::SpeechEnded { at, audio, .. }, decided, latency }) => {
                    let ended = uptime_of(start, at, decided, latency);
                    say(format!(
                        "{} user: ({:.2} s of speech, ended at {ended:.2}s)",
                        stamp(start),
                        audio.len() as f64 / 16_000.0
                    ));
                    spoke_at = Some(Instant::now());
                    pending_end = Some(ended);
                    actions = turns.handle(Event::SpeechEnded { at, audio });
                }
                Ok(ListenEvent::Stopped { error, .. }) => {
                    if let Some(e) = error {
                        log(format!("{} capture stopped: {e}", stamp(start)));
                    }
                    break;
                }
                Ok(ListenEvent::Device(e)) => log(format!("{} input device: {e}", stamp(start))),
                Ok(_) => {}
                Err(_) => break,
            },
            recv(conv.events()) -> ev => match ev {
                Ok(ConvEvent::ReplyStarted { response_id, item_id, latency_ms }) => {
                    current_item = Some(item_id);
                    let _ = latency_ms;
                    let line = format!("{} assistant: ", stamp(start));
                    let mut out = stdout.lock();
                    let _ = write!(out, "{line}");
                    let _ = out.flush();
                    OPEN_LINE.store(true, Ordering::Relaxed);
                    current = Some(response_id);
                    // Where this reply's first sample will be in the player's count.
                    reply_base = Some(player.written + player.pending.len() as u64);
                    player.begin_reply();
                    reply_done = false;
                    actions = turns.handle(Event::ReplyStarted);
                }
                Ok(ConvEvent::Text { response_id, .. } | ConvEvent::Audio { response_id, .. })
                    if Some(&response_id) == cancelled.as_ref() => {}
                Ok(ConvEvent::Text { piece, .. }) => {
                    let mut out = stdout.lock();
                    if !OPEN_LINE.swap(true, Ordering::Relaxed) {
                        // The line was ended by another one in between: go on after a stamp.
                        let _ = write!(out, "[{:>8.2}s] assistant: ...", start.elapsed().as_secs_f64());
                    }
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
                Ok(ConvEvent::Audio { samples, .. }) => {
                    if let Some(t) = spoke_at.take() {
                        log(format!("{} first audio {:.0} ms after the end of speech", stamp(start), t.elapsed().as_secs_f64() * 1e3));
                    }
                    player.reply_audio(&samples);
                }
                Ok(ConvEvent::ToolCall { name, arguments, call_id, .. }) => {
                    // The answer comes in a reply of its own, after the result.
                    tool_round = true;
                    say(format!("{} tool call {call_id}: {name}({arguments})", stamp(start)));
                }
                Ok(ConvEvent::ToolResult { call_id, output, ok, .. }) => {
                    say(format!("{} tool result {call_id} ({}): {output}", stamp(start), if ok { "ok" } else { "failed" }));
                }
                Ok(ConvEvent::TimerFired { label }) => {
                    say(format!("{} timer: {label:?} is done", stamp(start)));
                    player.queue(&chime());
                    player.pump(true, start);
                }
                Ok(ConvEvent::ReplyDone { response_id, text, audio_samples, cancelled: was_cut, .. }) => {
                    let frames = audio_samples / 1920;
                    say(format!(
                        "{} assistant {}: {text:?} ({frames} frames, {:.2} s of speech)",
                        stamp(start),
                        if was_cut { "(interrupted, kept)" } else { "(done)" },
                        audio_samples as f64 / 24_000.0
                    ));
                    if std::mem::take(&mut tool_round) && !was_cut {
                        // The tool runs, then the model answers: the response goes on.
                    } else if Some(&response_id) == current.as_ref() || current.is_none() {
                        replies += 1;
                        if was_cut {
                            reply_base = None;
                            reply_done = false;
                        } else {
                            reply_done = true;
                        }
                    }
                }
                Ok(ConvEvent::Transcript { item_id, text }) => {
                    transcripts = transcripts.saturating_sub(1);
                    say(format!("{} user ({item_id}): {text:?}", stamp(start)));
                }
                Ok(ConvEvent::Truncated { item_id, audio_samples, text }) => {
                    say(format!(
                        "{} assistant (interrupted, kept): {text:?} ({} frames, {:.2} s of speech; {item_id})",
                        stamp(start),
                        audio_samples / 1920,
                        audio_samples as f64 / 24_000.0
                    ));
                }
                Ok(ConvEvent::Trimmed { item_ids }) => {
                    say(format!("{} context full: dropped the {} oldest items", stamp(start), item_ids.len()));
                }
                Ok(ConvEvent::Error { message, .. }) => {
                    // Every reply ends with ReplyDone, failed ones too: this is only news.
                    log(format!("{} error: {message}", stamp(start)));
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        player.pump(reply_done, start);
        if let (Some(base), Some(ended)) = (reply_base, question_end) {
            let played = player.played();
            if played > base {
                // The first sample of the answer went to the device this long ago.
                let heard = start.elapsed().as_secs_f64() - (played - base) as f64 / 24_000.0;
                let delay = heard - ended;
                delays.push(delay);
                question_end = None;
                log(format!(
                    "{} answer audible {:.0} ms after the end of the question (ended at {ended:.2}s, first sample played at {heard:.2}s)",
                    stamp(start),
                    delay * 1e3
                ));
            }
        }
        // The reply is over once it has been generated and played out.
        if reply_done && (reply_base.is_none() || player.idle()) {
            reply_done = false;
            if reply_base.take().is_some() {
                let notes = player.end_reply();
                log(format!("{} reply played: {notes}", stamp(start)));
            }
            actions.extend(turns.handle(Event::ReplyFinished));
            if args.max_turns.is_some_and(|m| replies >= m) {
                break;
            }
        }
        for action in actions {
            match action {
                Action::Respond { audio } => {
                    user_turns += 1;
                    let id = format!("user-{user_turns}");
                    conv.add(id.clone(), Content::UserAudio(audio.clone()));
                    respond(&conv, user_turns);
                    question_end = pending_end.take();
                    if cfg.assistant.transcribe_user {
                        // The engine runs it when nothing else waits: the words are for the log.
                        conv.transcribe_when_idle(id.clone(), audio.clone());
                        transcripts += 1;
                    }
                    last_user = Some((id, audio));
                }
                Action::ExtendUtterance { audio } => {
                    // The reply was cancelled before it said anything (and so left nothing);
                    // the utterance goes on: one user turn of both pieces.
                    let mut whole = Vec::new();
                    if let Some((id, before)) = last_user.take() {
                        conv.delete(id);
                        whole = before;
                    }
                    whole.extend_from_slice(&audio);
                    user_turns += 1;
                    let id = format!("user-{user_turns}");
                    conv.add(id.clone(), Content::UserAudio(whole.clone()));
                    respond(&conv, user_turns);
                    question_end = pending_end.take();
                    if cfg.assistant.transcribe_user {
                        conv.transcribe_when_idle(id.clone(), whole.clone());
                        transcripts += 1;
                    }
                    last_user = Some((id, whole));
                }
                Action::StopPlayback => {
                    // What was heard, read before the device is cleared.
                    heard_at_stop = reply_base.map(|base| player.played().saturating_sub(base));
                    player.clear();
                }
                Action::CancelAndTruncateReply => {
                    cancelled = current.clone();
                    let heard = heard_at_stop
                        .take()
                        .or_else(|| reply_base.map(|base| player.played().saturating_sub(base)))
                        .unwrap_or(0);
                    barge_ins += 1;
                    if heard == 0 {
                        say(format!(
                            "{} barge-in: nothing of the reply had been heard yet; it is dropped",
                            stamp(start)
                        ));
                    } else {
                        say(format!(
                            "{} barge-in: the assistant is cut after {:.2} s of its reply",
                            stamp(start),
                            heard as f64 / 24_000.0
                        ));
                    }
                    if reply_base.is_some() {
                        let notes = player.end_reply();
                        log(format!("{} reply played (cut): {notes}", stamp(start)));
                    }
                    question_end = None;
                    match (&current_item, reply_done) {
                        // Generated already and still playing: cut the item that is in the
                        // conversation to what was heard.
                        (Some(item), true) => {
                            conv.truncate(item.clone(), heard);
                            reply_done = true;
                        }
                        _ => conv.cancel(Some(heard)),
                    }
                    reply_base = None;
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    // At the end of a scripted session (--max-turns, --seconds) the last words still to be
    // transcribed are waited for, a few seconds at most, so that the log is complete; a signal
    // does not wait.
    let wait_until = Instant::now() + Duration::from_secs(10);
    while signal.is_none() && transcripts > 0 && Instant::now() < wait_until {
        select! {
            recv(stop) -> sig => signal = Some(sig.unwrap_or(0)),
            recv(conv.events()) -> ev => match ev {
                Ok(ConvEvent::Transcript { item_id, text }) => {
                    transcripts -= 1;
                    say(format!("{} user ({item_id}): {text:?}", stamp(start)));
                }
                Ok(ConvEvent::Error { message, .. }) => {
                    transcripts -= 1;
                    log(format!("{} error: {message}", stamp(start)));
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(100)) => {}
        }
    }
    // Stop at once: nothing more is played or generated.
    conv.cancel(Some(0));
    if signal.is_some() {
        player.clear();
    }
    listener.stop();
    let stats = player.playback.stats();
    player.close();
    delays.sort_by(f64::total_cmp);
    let latency = match delays.as_slice() {
        [] => String::new(),
        d => format!(
            "; answers audible {:.0} ms (median) / {:.0} ms (max) after the question",
            d[d.len() / 2] * 1e3,
            d[d.len() - 1] * 1e3
        ),
    };
    log(format!(
        "{} stopped after {replies} replies{}: {user_turns} user turns, {barge_ins} barge-ins, {} playback underruns{latency}",
        stamp(start),
        match signal {
            Some(sig) => format!(" ({})", signal_name(sig)),
            None => String::new(),
        },
        stats.xruns + stats.device_xruns
    ));
    Ok(())
}

fn respond(conv: &Conversation, n: u64) {
    conv.respond(Respond {
        response_id: format!("reply-{n}"),
        item_id: format!("reply-{n}"),
        output: None,
    });
}

/// Appends a line to the transcript file, if there is one.
struct Transcript(Option<std::fs::File>);

impl Transcript {
    fn open(cfg: &Config) -> anyhow::Result<Self> {
        if cfg.assistant.transcript_file.is_empty() {
            return Ok(Self(None));
        }
        let path = &cfg.assistant.transcript_file;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the transcript file {path}"))?;
        Ok(Self(Some(file)))
    }

    fn line(&mut self, start: Instant, line: &str) {
        println!("{line}");
        let _ = std::io::stdout().flush();
        if let Some(f) = &mut self.0 {
            if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                eprintln!("{} transcript file: {e}", stamp(start));
            }
        }
    }
}

/// Text on one line (a transcript line is one utterance).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn clock(d: Duration) -> String {
    let s = d.as_secs_f64();
    format!(
        "{:02}:{:02}:{:05.2}",
        (s / 3600.0) as u64,
        (s / 60.0) as u64 % 60,
        s % 60.0
    )
}

/// Live transcription, or translation: each utterance on its own, with its timestamps.
fn transcribe_or_translate(
    args: &Args,
    r: &Resolved,
    engine: &EngineHandle,
    stop: &Receiver<i32>,
) -> anyhow::Result<()> {
    let (cfg, start) = (&r.cfg, r.start);
    let translate = r.mode == Mode::Translate;
    let lang = cfg.assistant.translate_to.trim();
    let spoken = translate && cfg.assistant.speak_translation;
    let conv = engine.open(Setup {
        instructions: if translate {
            format!("Translate what the user says into {lang}. Answer with the translation only.")
        } else {
            String::new()
        },
        tools: Vec::new(),
        tool_policy: ToolPolicy::Report,
        params: sampling(cfg),
        output: if spoken { Output::Speech } else { Output::Text },
    })?;
    let mut out = Transcript::open(cfg)?;
    let mut player = if spoken {
        Some(Player::open(
            &device(args.output.as_deref(), &cfg.audio.output)?,
            None,
        )?)
    } else {
        None
    };
    // Transcription has no playback, so nothing to echo; spoken translations are not
    // interrupted (half duplex keeps the microphone from hearing them).
    let reference = player
        .as_ref()
        .map(|_| EchoReference::new(PLAYBACK_SOURCE_RATE))
        .transpose()?;
    if let (Some(p), Some(rf)) = (player.as_mut(), reference.as_ref()) {
        p.reference = Some(rf.clone());
    }
    let r2 = Resolved {
        cfg: r.cfg.clone(),
        mode: r.mode,
        echo: if spoken {
            EchoMode::HalfDuplex
        } else {
            EchoMode::Off
        },
        start,
    };
    let listener = listen(args, &r2, reference)?;
    eprintln!(
        "{} {} (Ctrl-C to stop)",
        stamp(start),
        if translate {
            format!("translating into {lang}")
        } else {
            "transcribing".into()
        }
    );
    let deadline = args
        .seconds
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let mut n = 0u64;
    let mut spans: std::collections::HashMap<String, (Duration, Duration)> = Default::default();
    let mut done = 0u64;
    let mut text = String::new();
    let mut signal = None;
    loop {
        select! {
            recv(stop) -> sig => {
                signal = Some(sig.unwrap_or(0));
                break;
            }
            recv(listener.events()) -> ev => match ev {
                Ok(ListenEvent::Vad { event: VadEvent::SpeechEnded { started, at, audio, .. }, .. }) => {
                    n += 1;
                    let id = format!("utterance-{n}");
                    spans.insert(id.clone(), (started, at));
                    if translate {
                        conv.add(id.clone(), Content::UserAudio(audio));
                        conv.respond(Respond { response_id: id.clone(), item_id: format!("{id}-reply"), output: None });
                    } else {
                        conv.transcribe(id, audio);
                    }
                }
                Ok(ListenEvent::Stopped { error, .. }) => {
                    if let Some(e) = error {
                        eprintln!("{} capture stopped: {e}", stamp(start));
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            },
            recv(conv.events()) -> ev => match ev {
                Ok(ConvEvent::Transcript { item_id, text }) => {
                    let (a, b) = spans.remove(&item_id).unwrap_or_default();
                    out.line(start, &format!("[{} --> {}] {}", clock(a), clock(b), one_line(&text)));
                    done += 1;
                }
                Ok(ConvEvent::Text { piece, .. }) => text.push_str(&piece),
                Ok(ConvEvent::Audio { samples, .. }) => {
                    if let Some(p) = player.as_mut() {
                        p.queue(&samples);
                    }
                }
                Ok(ConvEvent::ReplyDone { response_id, item_id, .. }) => {
                    let (a, b) = spans.remove(&response_id).unwrap_or_default();
                    out.line(start, &format!("[{} --> {}] ({lang}) {}", clock(a), clock(b), one_line(&std::mem::take(&mut text))));
                    // Each utterance stands alone.
                    conv.delete(item_id);
                    conv.delete(response_id);
                    done += 1;
                }
                Ok(ConvEvent::Error { message, .. }) => {
                    eprintln!("{} error: {message}", stamp(start));
                    done += 1;
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        if let Some(p) = player.as_mut() {
            p.pump(true, start);
        }
        if args.max_turns.is_some_and(|m| done >= m) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    conv.cancel(Some(0));
    listener.stop();
    if let Some(mut p) = player {
        if signal.is_some() {
            p.clear();
        }
        p.close();
    }
    eprintln!(
        "{} stopped after {done} utterances{}",
        stamp(start),
        signal.map_or(String::new(), |s| format!(" ({})", signal_name(s)))
    );
    Ok(())
}

/// Reads lines of stdin aloud.
fn speak(
    args: &Args,
    r: &Resolved,
    engine: &EngineHandle,
    stop: &Receiver<i32>,
) -> anyhow::Result<()> {
    let (cfg, start) = (&r.cfg, r.start);
    let voice = crate::voices::find(&cfg.assistant.voice, None)?;
    let mut params = sampling(cfg);
    params.audio = SamplingParams::new(voice.audio_temperature, voice.audio_top_k);
    let conv = engine.open(Setup {
        instructions: voice.system_prompt.clone(),
        tools: Vec::new(),
        tool_policy: ToolPolicy::Report,
        params,
        output: Output::Tts,
    })?;
    let mut player = Player::open(&device(args.output.as_deref(), &cfg.audio.output)?, None)?;
    eprintln!(
        "{} reading stdin aloud with the {} voice",
        stamp(start),
        voice.name
    );
    let (lines_tx, lines) = crossbeam_channel::unbounded::<String>();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        })?;
    let mut asked = 0u64;
    let mut done = 0u64;
    let mut eof = false;
    let mut signal = None;
    loop {
        let lines_rx: Receiver<String> = if eof {
            crossbeam_channel::never()
        } else {
            lines.clone()
        };
        select! {
            recv(stop) -> sig => {
                signal = Some(sig.unwrap_or(0));
                break;
            }
            recv(lines_rx) -> line => match line {
                Ok(line) if line.trim().is_empty() => {}
                Ok(line) => {
                    asked += 1;
                    let id = format!("line-{asked}");
                    conv.add(id.clone(), Content::UserText(line));
                    conv.respond(Respond { response_id: id.clone(), item_id: format!("{id}-speech"), output: None });
                }
                Err(_) => eof = true,
            },
            recv(conv.events()) -> ev => match ev {
                Ok(ConvEvent::Audio { samples, .. }) => player.queue(&samples),
                Ok(ConvEvent::ReplyDone { response_id, item_id, text, audio_samples, .. }) => {
                    println!("{} said {text:?} ({:.2} s)", stamp(start), audio_samples as f64 / 24_000.0);
                    conv.delete(item_id);
                    conv.delete(response_id);
                    done += 1;
                }
                Ok(ConvEvent::Error { message, .. }) => {
                    eprintln!("{} error: {message}", stamp(start));
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        player.pump(done == asked, start);
        if eof && done == asked && player.idle() {
            break;
        }
        if args.max_turns.is_some_and(|m| done >= m) && player.idle() {
            break;
        }
    }
    conv.cancel(Some(0));
    if signal.is_some() {
        player.clear();
    }
    player.close();
    eprintln!(
        "{} stopped after {done} lines{}",
        stamp(start),
        signal.map_or(String::new(), |s| format!(" ({})", signal_name(s)))
    );
    Ok(())
}
