//! An OpenAI-Realtime-compatible WebSocket API (`lfm2d serve --listen ADDR`).
//!
//! Voice clients written for the OpenAI Realtime API (the official SDKs, pipecat and LiveKit
//! plugins, browser demos) connect to `ws://ADDR/v1/realtime` and talk to the local model
//! unchanged. Each connection is one session with its own conversation in the engine; the one
//! engine serves them in turn and generates their replies together, a step of each in turn.
//!
//! - [`protocol`]: client events parsed from text frames (both the beta and the GA dialect),
//!   server events written in the client's dialect.
//! - [`session`]: one session's state machine (settings, input buffer and server VAD, items,
//!   the reply in progress), free of I/O.
//! - [`server`]: the WebSocket server, authentication and limits.

pub mod protocol;
pub mod server;
pub mod session;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use audio_io::vad::VadAssets;

use crate::daemon::setup::Args;

/// The most input audio a session buffers before a commit: one append of the largest size the
/// reference allows (15 MiB of pcm16, 327 s) fits.
pub const MAX_BUFFER_SECONDS: usize = 330;

/// Parses `--listen` and refuses an address other than loopback without an API key.
pub(crate) fn listen_address(listen: &str, api_key: Option<&str>) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = listen.parse().with_context(|| {
        format!("--listen {listen:?}: expected an address and port such as 127.0.0.1:8765")
    })?;
    if !addr.ip().is_loopback() && api_key.is_none_or(str::is_empty) {
        anyhow::bail!(
            "--listen {addr} is reachable from other machines: give an API key with --api-key KEY \
             (or LFM2D_API_KEY), or listen on 127.0.0.1"
        );
    }
    Ok(addr)
}

/// `lfm2d serve --listen ADDR`: the Realtime API server alone (no sound devices).
pub fn run(
    args: &Args,
    listen: &str,
    stop: &crossbeam_channel::Receiver<i32>,
) -> anyhow::Result<()> {
    let api_key = args.api_key.clone().filter(|k| !k.is_empty());
    let addr = listen_address(listen, api_key.as_deref())?;
    let cfg = crate::daemon::setup::configured(args)?;
    let started = Instant::now();
    let crate::daemon::setup::Loaded {
        dir: model_dir,
        quant,
        model,
        detok,
    } = crate::daemon::setup::load(args, &cfg)?;
    let model_ref = Arc::clone(&model);
    let (engine, engine_thread) =
        crate::engine::spawn_with(model, detok, crate::daemon::setup::engine_options(&cfg))?;
    let shared = shared(
        &cfg,
        &model_dir,
        &model_ref,
        engine.clone(),
        api_key,
        started,
    );
    let servers = async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "[{:>8.2}s] model loaded from {} ({quant:?}); listening on ws://{local}{}",
            started.elapsed().as_secs_f64(),
            model_dir.display(),
            server::PATH
        );
        server::serve(listener, shared).await
    };
    crate::daemon::shutdown::serve_until_stopped(servers, stop, engine, engine_thread, started)
}

/// The server's state over a running engine (the Wyoming server may share the engine).
pub(crate) fn shared(
    cfg: &crate::config::Config,
    model_dir: &std::path::Path,
    model: &Arc<lfm2_audio::model::Lfm2AudioModel>,
    engine: crate::engine::EngineHandle,
    api_key: Option<String>,
    started: Instant,
) -> Arc<server::Shared> {
    let params = crate::daemon::setup::sampling(cfg);
    let vad_assets = VadAssets::locate().map_err(|e| e.to_string());
    if let Err(e) = &vad_assets {
        eprintln!("warning: server VAD is off (sessions start with manual turn-taking): {e}");
    }
    let context = {
        let model_max = model.config.lfm.max_position_embeddings;
        match cfg.assistant.context_limit {
            0 => model_max,
            n => n.min(model_max),
        }
    };
    let budget = {
        let text_model = Arc::clone(model);
        let audio_model = Arc::clone(model);
        session::Budget {
            context,
            // A text the tokenizer fails on cannot go in either.
            text: Arc::new(move |t: &str| {
                text_model
                    .tokenizer
                    .encode(t)
                    .map_or(usize::MAX / 4, |ids| ids.len())
            }),
            audio: Arc::new(move |n: usize| audio_model.audio.positions(n)),
        }
    };
    let defaults = session::SessionDefaults {
        model: model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lfm2-audio".into()),
        instructions: cfg.assistant.system_prompt.clone(),
        voice: cfg.assistant.voice.clone(),
        params,
        vad_assets,
        min_speech: Duration::from_millis(cfg.vad.min_speech_ms),
        pause: Duration::from_millis(cfg.vad.pause_ms),
        max_buffer_samples: MAX_BUFFER_SECONDS * protocol::SAMPLE_RATE as usize,
        budget: Some(budget),
        speculative_start: cfg.assistant.speculative_start,
    };
    let limits = server::Limits::from_env();
    server::raise_descriptor_limit();
    Arc::new(server::Shared {
        engine,
        defaults,
        api_key,
        sessions: tokio::sync::Semaphore::new(limits.max_sessions),
        pending: Default::default(),
        limits,
        next_session: AtomicU64::new(1),
        started,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_needs_no_key_and_other_addresses_do() {
        assert!(listen_address("127.0.0.1:8765", None).is_ok());
        assert!(listen_address("[::1]:0", None).is_ok());
        let e = listen_address("0.0.0.0:8765", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--api-key"), "{e}");
        assert!(listen_address("0.0.0.0:8765", Some("")).is_err());
        assert!(listen_address("0.0.0.0:8765", Some("secret")).is_ok());
        let e = listen_address("localhost", None).unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:8765"), "{e}");
    }
}
