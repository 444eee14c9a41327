//! What every front end of `lfm2d serve` starts from: the command-line arguments, the
//! configuration file with the flags applied, the model and its audio decoder, the engine's
//! options and sampling, the assistant's tools, and the sound devices (the microphone through
//! the echo canceller to the VAD). The voice loop, the modes, the Realtime and the Wyoming
//! servers all build on this module; it depends on none of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use audio_io::echo::{EchoCanceller, EchoConfig, EchoMode, EchoReference};
use audio_io::vad::{SileroVad, VadAssets, VadConfig};
use audio_io::{DeviceCapture, DeviceSelector, Listener, ListenerConfig};
use lfm2_audio::generate::GenerationParams;
use lfm2_audio::sampling::SamplingParams;

use crate::cmd::runtime::{Quant, RuntimeArgs};
use crate::cmd::speech::CodecArg;
use crate::config::Config;
use crate::engine::EngineOptions;

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

/// Everything `run` resolved from the configuration and the flags.
pub(crate) struct Resolved {
    pub cfg: Config,
    pub mode: Mode,
    pub echo: EchoMode,
    pub start: Instant,
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

pub(crate) fn resolve(args: &Args) -> anyhow::Result<Resolved> {
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

pub(crate) fn device(flag: Option<&str>, configured: &str) -> anyhow::Result<DeviceSelector> {
    flag.unwrap_or(configured)
        .parse()
        .map_err(anyhow::Error::msg)
}

/// The microphone, through the echo canceller (unless off), to the VAD.
pub(crate) fn listen(
    args: &Args,
    r: &Resolved,
    reference: Option<EchoReference>,
) -> anyhow::Result<Listener> {
    let cfg = &r.cfg;
    let vad_cfg = VadConfig {
        prefix_padding: Duration::from_millis(cfg.vad.prefix_padding_ms),
        min_silence: Duration::from_millis(cfg.vad.silence_duration_ms),
        min_speech: Duration::from_millis(cfg.vad.min_speech_ms),
        pause: Duration::from_millis(cfg.vad.pause_ms),
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

/// The assistant's tools: the built-ins and the configured ones.
pub(crate) fn tools(cfg: &Config) -> Vec<dialog::tools::ToolSpec> {
    let mut tools = if cfg.assistant.builtin_tools {
        dialog::tools::built_in()
    } else {
        Vec::new()
    };
    tools.extend(cfg.tools.iter().cloned());
    tools
}
