//! `lfm2d serve`: the voice assistant. Microphone → VAD → user turn → interleaved generation →
//! streaming detokenizer → speaker, continuously, over many turns, with barge-in.
//!
//! Threads: the capture pump (audio-io's `Listener`), the engine (the model), and this loop,
//! which runs the turn state machine, feeds the player, and prints the conversation.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use audio_io::vad::{SileroVad, VadAssets, VadConfig, VadEvent};
use audio_io::{
    DeviceCapture, DevicePlayback, DeviceSelector, ListenEvent, Listener, ListenerConfig, Playback,
    PLAYBACK_SOURCE_RATE,
};
use crossbeam_channel::{select, unbounded};
use dialog::turn::{Action, Event, TurnManager};
use lfm2_audio::generate::GenerationParams;
use lfm2_audio::sampling::SamplingParams;

use super::engine::{Engine, EngineConfig, EngineEvent, Interrupt, Request};
use crate::cmd::runtime::{Quant, RuntimeArgs};
use crate::cmd::speech::CodecArg;
use crate::config::Config;

#[derive(clap::Args, Debug)]
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
    /// Input device (name or index).
    #[arg(long)]
    pub input: Option<String>,
    /// Output device (name or index).
    #[arg(long)]
    pub output: Option<String>,
    /// Never interrupt the assistant (for loudspeakers without echo handling).
    #[arg(long)]
    pub half_duplex: bool,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many replies (for scripted use and tests).
    #[arg(long)]
    pub max_turns: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub seconds: Option<f64>,
}

/// Seconds since the daemon started, for the log.
fn stamp(start: Instant) -> String {
    format!("[{:>8.2}s]", start.elapsed().as_secs_f64())
}

pub fn run(args: Args) -> anyhow::Result<()> {
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
    let start = Instant::now();
    let model = Arc::new(runtime.load(&model_dir)?);
    let codec = match cfg.model.codec.as_str() {
        "lfm2" => CodecArg::Lfm2,
        "mimi" => CodecArg::Mimi,
        _ => CodecArg::Auto,
    };
    let detok = codec::open_detokenizer_with(&model_dir, codec.into(), &model.plan)
        .context("loading the audio decoder")?;
    eprintln!(
        "{} model loaded from {} ({quant:?})",
        stamp(start),
        model_dir.display()
    );

    let opt = |v: f32| (v > 0.0).then_some(v);
    let params = GenerationParams {
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
    };
    let (req_tx, req_rx) = unbounded::<Request>();
    let (ev_tx, ev_rx) = unbounded::<EngineEvent>();
    let interrupt = Arc::new(Interrupt::default());
    let engine = Engine::new(
        Arc::clone(&model),
        detok,
        EngineConfig {
            system_prompt: cfg.assistant.system_prompt.clone(),
            params,
        },
        Arc::clone(&interrupt),
        ev_tx,
    )?;
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine.run(req_rx))?;

    let input: DeviceSelector = args
        .input
        .as_deref()
        .unwrap_or(&cfg.audio.input)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let output: DeviceSelector = args
        .output
        .as_deref()
        .unwrap_or(&cfg.audio.output)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let vad_cfg = VadConfig {
        prefix_padding: Duration::from_millis(cfg.vad.prefix_padding_ms),
        min_silence: Duration::from_millis(cfg.vad.silence_duration_ms),
        min_speech: Duration::from_millis(cfg.vad.min_speech_ms),
        ..VadConfig::with_threshold(cfg.vad.threshold)
    };
    vad_cfg.validate().map_err(anyhow::Error::msg)?;
    let vad = SileroVad::load(&VadAssets::locate()?)?;
    let capture = DeviceCapture::open(&input)?;
    let listener = Listener::start(
        Box::new(capture),
        vad,
        ListenerConfig {
            vad: vad_cfg,
            levels: false,
            tap_audio: false,
        },
    )?;
    let mut playback = DevicePlayback::open(&output, PLAYBACK_SOURCE_RATE)?;
    let half_duplex = args.half_duplex || cfg.echo.mode == "half-duplex";
    let mut turns = TurnManager::new(half_duplex);
    turns.handle(Event::Start);
    eprintln!("{} listening (say something; Ctrl-C to stop)", stamp(start));

    // Samples written to the player since it opened, and where the current reply began. Audio
    // waits in `pending` and goes to the player at most LEAD ahead of what has been heard, so
    // that writing never blocks this loop and a barge-in has little to throw away.
    const LEAD: u64 = 24_000 * 2 / 5;
    let mut pending: std::collections::VecDeque<f32> = std::collections::VecDeque::new();
    // Replies that were interrupted: their late events are dropped.
    let mut cancelled_turn: Option<u64> = None;
    let mut current_turn: u64 = 0;
    let mut written: u64 = 0;
    let mut finish_called = false;
    let mut reply_base: Option<u64> = None;
    let mut reply_done = false;
    let mut replies = 0u64;
    let mut spoke_at: Option<Instant> = None;
    let deadline = args
        .seconds
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let stdout = std::io::stdout();
    loop {
        let mut actions = Vec::new();
        select! {
            recv(listener.events()) -> ev => match ev {
                Ok(ListenEvent::Vad { event: VadEvent::SpeechStarted { at }, .. }) => {
                    println!("{} user: (speaking at {:.2}s)", stamp(start), at.as_secs_f64());
                    actions = turns.handle(Event::SpeechStarted { at });
                }
                Ok(ListenEvent::Vad { event: VadEvent::SpeechEnded { at, audio, .. }, .. }) => {
                    println!("{} user: ({:.2} s of speech)", stamp(start), audio.len() as f64 / 16_000.0);
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
            recv(ev_rx) -> ev => match ev {
                Ok(EngineEvent::ReplyStarted { turn, prefill_ms }) => {
                    current_turn = turn;
                    finish_called = false;
                    let _ = write!(stdout.lock(), "{} assistant: ", stamp(start));
                    let _ = stdout.lock().flush();
                    let _ = prefill_ms;
                    reply_base = Some(written);
                    reply_done = false;
                    actions = turns.handle(Event::ReplyStarted);
                }
                Ok(EngineEvent::Text { turn, .. }) if Some(turn) == cancelled_turn => {}
                Ok(EngineEvent::Audio { turn, .. }) if Some(turn) == cancelled_turn => {}
                Ok(EngineEvent::Text { piece, .. }) => {
                    let _ = write!(stdout.lock(), "{piece}");
                    let _ = stdout.lock().flush();
                }
                Ok(EngineEvent::Audio { samples, .. }) => {
                    if let Some(t) = spoke_at.take() {
                        eprintln!("{} first audio {:.0} ms after the end of speech", stamp(start), t.elapsed().as_secs_f64() * 1e3);
                    }
                    pending.extend(samples);
                }
                Ok(EngineEvent::ReplyDone { text, frames, cancelled, .. }) => {
                    let _ = writeln!(stdout.lock());
                    println!(
                        "{} assistant {}: {text:?} ({frames} frames, {:.2} s of speech)",
                        stamp(start),
                        if cancelled { "(interrupted, kept)" } else { "(done)" },
                        frames as f64 * 0.08
                    );
                    replies += 1;
                    reply_done = true;
                    if cancelled {
                        reply_base = None;
                        reply_done = false;
                    }
                }
                Ok(EngineEvent::Error(e)) => {
                    eprintln!("{} error: {e}", stamp(start));
                    reply_done = true;
                }
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        // Feed the player, never more than LEAD ahead of what has been heard.
        while !pending.is_empty() && written.saturating_sub(playback.played()) < LEAD {
            let n = pending.len().min(1920);
            let chunk: Vec<f32> = pending.drain(..n).collect();
            if let Err(e) = playback.write(&chunk) {
                eprintln!("{} playback: {e}", stamp(start));
            }
            written += n as u64;
        }
        if reply_done && pending.is_empty() && !finish_called {
            // Let the rest (and the resampler's tail) play out.
            finish_called = true;
            if let Err(e) = playback.finish() {
                eprintln!("{} playback: {e}", stamp(start));
            }
        }
        // The reply is over once it has been generated and played out.
        if reply_done
            && pending.is_empty()
            && (reply_base.is_none() || playback.wait_idle(Duration::ZERO))
        {
            reply_done = false;
            reply_base = None;
            actions.extend(turns.handle(Event::ReplyFinished));
            if args.max_turns.is_some_and(|m| replies >= m) {
                break;
            }
        }
        for action in actions {
            match action {
                Action::Respond { audio } | Action::ExtendUtterance { audio } => {
                    let _ = req_tx.send(Request::UserAudio(audio));
                }
                Action::StopPlayback => {
                    pending.clear();
                    playback.clear();
                }
                Action::CancelAndTruncateReply => {
                    cancelled_turn = Some(current_turn);
                    let heard = reply_base.map_or(0, |base| playback.played().saturating_sub(base));
                    println!(
                        "{} barge-in: the assistant is cut after {:.2} s of its reply",
                        stamp(start),
                        heard as f64 / 24_000.0
                    );
                    interrupt.interrupt(heard);
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    interrupt.interrupt(0);
    let _ = req_tx.send(Request::Shutdown);
    listener.stop();
    let _ = playback.finish();
    let _ = engine_thread.join();
    eprintln!("{} stopped after {replies} replies", stamp(start));
    Ok(())
}
