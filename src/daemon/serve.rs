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
    let quant = args.quant.unwrap_or(match cfg.model.quant.as_str() {
        "f32" => Quant::F32,
        "q8" => Quant::Q8,
        _ => Quant::Q4,
    });
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

/// Seconds since the daemon started, for the log.
fn stamp(start: Instant) -> String {
    format!("[{:>8.2}s]", start.elapsed().as_secs_f64())
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
    if let Some(address) = crate::wyoming::wanted(&args)? {
        return crate::wyoming::run(&args, &address, args.listen.as_deref());
    }
    if let Some(listen) = &args.listen {
        return crate::realtime::run(&args, listen);
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
    let (engine, engine_thread) = engine::spawn_with(
        model,
        detok,
        EngineOptions {
            context_limit: (cfg.assistant.context_limit > 0).then_some(cfg.assistant.context_limit),
        },
    )?;
    let result = match r.mode {
        Mode::Assistant => assistant(&args, &r, &engine),
        Mode::Transcribe | Mode::Translate => transcribe_or_translate(&args, &r, &engine),
        Mode::Speak => speak(&args, &r, &engine),
    };
    engine.shutdown();
    let _ = engine_thread.join();
    result
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
struct Player {
    playback: DevicePlayback,
    reference: Option<EchoReference>,
    pending: VecDeque<f32>,
    /// Samples written since the device opened.
    written: u64,
    finished: bool,
}

impl Player {
    /// 0.4 s at 24 kHz.
    const LEAD: u64 = 24_000 * 2 / 5;

    fn open(sel: &DeviceSelector, reference: Option<EchoReference>) -> anyhow::Result<Self> {
        Ok(Self {
            playback: DevicePlayback::open(sel, PLAYBACK_SOURCE_RATE)?,
            reference,
            pending: VecDeque::new(),
            written: 0,
            finished: true,
        })
    }

    fn queue(&mut self, samples: &[f32]) {
        self.pending.extend(samples);
        self.finished = false;
    }

    /// Samples the device has played since it opened.
    fn played(&self) -> u64 {
        self.playback.played()
    }

    /// Moves queued audio to the device; once the queue is empty and `done`, lets the device
    /// play out what it holds.
    fn pump(&mut self, done: bool, start: Instant) {
        while !self.pending.is_empty() && self.written.saturating_sub(self.played()) < Self::LEAD {
            let n = self.pending.len().min(1920);
            let chunk: Vec<f32> = self.pending.drain(..n).collect();
            if let Err(e) = self.playback.write(&chunk) {
                eprintln!("{} playback: {e}", stamp(start));
            }
            if let Some(r) = &self.reference {
                r.push(&chunk, self.played());
            }
            self.written += n as u64;
        }
        if done && self.pending.is_empty() && !self.finished {
            self.finished = true;
            if let Err(e) = self.playback.finish() {
                eprintln!("{} playback: {e}", stamp(start));
            }
            if let Some(r) = &self.reference {
                r.finish();
            }
        } else if let Some(r) = &self.reference {
            r.observe(self.played());
        }
    }

    /// Whether everything queued has been played.
    fn idle(&mut self) -> bool {
        self.pending.is_empty()
            && (self.finished || self.written == 0)
            && self.playback.wait_idle(Duration::ZERO)
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.playback.clear();
        self.finished = true;
        if let Some(r) = &self.reference {
            r.finish();
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

fn assistant(args: &Args, r: &Resolved, engine: &EngineHandle) -> anyhow::Result<()> {
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
    let mut user_turns = 0u64;
    let mut last_user: Option<(String, Vec<f32>)> = None;
    let mut spoke_at: Option<Instant> = None;
    let mut tool_round = false;
    let mut heard_at_stop: Option<u64> = None;
    let mut current_item: Option<String> = None;
    let deadline = args
        .seconds
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let stdout = std::io::stdout();
    let say = |line: String| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    loop {
        let mut actions = Vec::new();
        select! {
            recv(listener.events()) -> ev => match ev {
                Ok(ListenEvent::Vad { event: VadEvent::SpeechStarted { at }, .. }) => {
                    say(format!("{} user: (speaking at {:.2}s)", stamp(start), at.as_secs_f64()));
                    actions = turns.handle(Event::SpeechStarted { at });
                }
                Ok(ListenEvent::Vad { event: VadEvent::SpeechEnded { at, audio, .. }, .. }) => {
                    say(format!("{} user: ({:.2} s of speech)", stamp(start), audio.len() as f64 / 16_000.0));
                    spoke_at = Some(Instant::now());
                    actions = turns.handle(Event::SpeechEnded { at, audio });
                }
                Ok(ListenEvent::Stopped { error, .. }) => {
                    if let Some(e) = error {
                        eprintln!("{} capture stopped: {e}", stamp(start));
                    }
                    break;
                }
                Ok(ListenEvent::Device(e)) => eprintln!("{} input device: {e:?}", stamp(start)),
                Ok(_) => {}
                Err(_) => break,
            },
            recv(conv.events()) -> ev => match ev {
                Ok(ConvEvent::ReplyStarted { response_id, item_id, latency_ms }) => {
                    current_item = Some(item_id);
                    let _ = latency_ms;
                    let mut out = stdout.lock();
                    let _ = write!(out, "{} assistant: ", stamp(start));
                    let _ = out.flush();
                    current = Some(response_id);
                    reply_base = Some(player.written);
                    reply_done = false;
                    actions = turns.handle(Event::ReplyStarted);
                }
                Ok(ConvEvent::Text { response_id, .. } | ConvEvent::Audio { response_id, .. })
                    if Some(&response_id) == cancelled.as_ref() => {}
                Ok(ConvEvent::Text { piece, .. }) => {
                    let mut out = stdout.lock();
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
                Ok(ConvEvent::Audio { samples, .. }) => {
                    if let Some(t) = spoke_at.take() {
                        eprintln!("{} first audio {:.0} ms after the end of speech", stamp(start), t.elapsed().as_secs_f64() * 1e3);
                    }
                    player.queue(&samples);
                }
                Ok(ConvEvent::ToolCall { name, arguments, call_id, .. }) => {
                    // The answer comes in a reply of its own, after the result.
                    tool_round = true;
                    say(format!("\n{} tool call {call_id}: {name}({arguments})", stamp(start)));
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
                    say(String::new());
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
                    eprintln!("{} error: {message}", stamp(start));
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        player.pump(reply_done, start);
        // The reply is over once it has been generated and played out.
        if reply_done && (reply_base.is_none() || player.idle()) {
            reply_done = false;
            reply_base = None;
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
                    if cfg.assistant.transcribe_user {
                        // After the reply in the queue: the words are for the log.
                        conv.transcribe(id.clone(), audio.clone());
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
                    if cfg.assistant.transcribe_user {
                        conv.transcribe(id.clone(), whole.clone());
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
                    if reply_base.is_some() {
                        say(format!(
                            "{} barge-in: the assistant is cut after {:.2} s of its reply",
                            stamp(start),
                            heard as f64 / 24_000.0
                        ));
                    }
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
    conv.cancel(Some(0));
    listener.stop();
    player.close();
    eprintln!("{} stopped after {replies} replies", stamp(start));
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
fn transcribe_or_translate(args: &Args, r: &Resolved, engine: &EngineHandle) -> anyhow::Result<()> {
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
    loop {
        select! {
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
    listener.stop();
    if let Some(p) = player {
        p.close();
    }
    eprintln!("{} stopped after {done} utterances", stamp(start));
    Ok(())
}

/// Reads lines of stdin aloud.
fn speak(args: &Args, r: &Resolved, engine: &EngineHandle) -> anyhow::Result<()> {
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
    loop {
        let lines_rx: Receiver<String> = if eof {
            crossbeam_channel::never()
        } else {
            lines.clone()
        };
        select! {
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
    player.close();
    eprintln!("{} stopped after {done} lines", stamp(start));
    Ok(())
}
