//! A Wyoming protocol server (`lfm2d serve --wyoming tcp://HOST:PORT`) for Home Assistant: speech
//! to text, text to speech and a conversation agent, on the same engine as the Realtime API.
//!
//! - [`protocol`]: the event codec (header line, data, payload), free of I/O;
//! - [`audio`]: chunks of any format to the model's 16 kHz mono, speech to 16-bit PCM;
//! - [`session`]: one connection's state machine, free of I/O;
//! - [`server`]: the TCP server, the conversations kept by id, limits;
//! - [`zeroconf`]: the mDNS announcement Home Assistant discovers.

pub mod audio;
pub mod protocol;
pub mod server;
pub mod session;
pub mod zeroconf;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::daemon::setup::Args;

/// The port Wyoming services use by convention for speech to text.
pub const DEFAULT_PORT: u16 = 10300;

/// Parses `tcp://HOST:PORT` (the scheme and the port may be left out).
pub fn parse_address(address: &str) -> anyhow::Result<SocketAddr> {
    let bad = |why: &str| {
        anyhow::anyhow!("--wyoming {address:?}: {why}; expected tcp://HOST:PORT such as tcp://127.0.0.1:{DEFAULT_PORT}")
    };
    let rest = match address.split_once("://") {
        Some(("tcp", rest)) => rest,
        Some((scheme, _)) => return Err(bad(&format!("{scheme}:// is not supported"))),
        None => address,
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(bad("no host"));
    }
    let with_port = if rest.starts_with('[') {
        if rest.contains("]:") {
            rest.to_owned()
        } else {
            format!("{rest}:{DEFAULT_PORT}")
        }
    } else {
        match rest.matches(':').count() {
            0 => format!("{rest}:{DEFAULT_PORT}"),
            1 => rest.to_owned(),
            // A bare IPv6 address.
            _ => format!("[{rest}]:{DEFAULT_PORT}"),
        }
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("the host has no address"))
}

/// The Wyoming address from the flag or the configuration file, if the server is wanted.
pub fn wanted(args: &Args) -> anyhow::Result<Option<String>> {
    if let Some(a) = &args.wyoming {
        return Ok(Some(a.clone()));
    }
    let cfg = crate::daemon::setup::configured(args)?;
    Ok((!cfg.wyoming.address.trim().is_empty()).then(|| cfg.wyoming.address.clone()))
}

/// `lfm2d serve --wyoming ADDR [--listen ADDR]`: the Wyoming server, and the Realtime API server
/// too when asked, on one engine (no sound devices).
pub fn run(
    args: &Args,
    address: &str,
    listen: Option<&str>,
    stop: &crossbeam_channel::Receiver<i32>,
) -> anyhow::Result<()> {
    let addr = parse_address(address)?;
    let api_key = args.api_key.clone().filter(|k| !k.is_empty());
    let realtime_addr = listen
        .map(|l| crate::realtime::listen_address(l, api_key.as_deref()))
        .transpose()?;
    let cfg = crate::daemon::setup::configured(args)?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "warning: the Wyoming server at tcp://{addr} is reachable from other machines; the Wyoming protocol has no authentication, so anyone who can reach it can use the model"
        );
    }
    let started = Instant::now();
    let crate::daemon::setup::Loaded {
        dir: model_dir,
        quant,
        model,
        detok,
    } = crate::daemon::setup::load(args, &cfg)?;
    let voices = crate::voices::all(None)?;
    let default_voice = if voices.iter().any(|v| v.name == cfg.assistant.voice) {
        cfg.assistant.voice.clone()
    } else {
        voices.first().map(|v| v.name.clone()).unwrap_or_default()
    };
    let model_name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lfm2-audio".into());
    let offer = session::Offer {
        model: model_name,
        languages: vec!["en".into()],
        voices: voices
            .iter()
            .map(|v| (v.name.clone(), v.description.clone()))
            .collect(),
        default_voice,
        max_tool_rounds: cfg.assistant.max_tool_rounds,
    };
    let tools = crate::daemon::setup::tools(&cfg);
    let model_ref = Arc::clone(&model);
    let (engine, engine_thread) =
        crate::engine::spawn_with(model, detok, crate::daemon::setup::engine_options(&cfg))?;
    let shared = Arc::new(server::Shared::new(
        engine.clone(),
        offer,
        voices,
        crate::daemon::setup::sampling(&cfg),
        cfg.wyoming.system_prompt.clone(),
        tools,
        server::Limits::default(),
        started,
    ));
    let realtime = realtime_addr.map(|a| {
        (
            a,
            crate::realtime::shared(
                &cfg,
                &model_dir,
                &model_ref,
                engine.clone(),
                api_key.clone(),
                started,
            ),
        )
    });
    let zeroconf_on = cfg.wyoming.zeroconf && !args.no_zeroconf;
    let servers = async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on tcp://{addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "[{:>8.2}s] model loaded from {} ({quant:?}); Wyoming server on tcp://{local}",
            started.elapsed().as_secs_f64(),
            model_dir.display(),
        );
        // Kept until the server stops: dropping it withdraws the announcement.
        let _announcement = if zeroconf_on {
            match zeroconf::announce(local) {
                Ok(a) => {
                    eprintln!("wyoming: announced as {} (mDNS)", a.instance());
                    Some(a)
                }
                Err(e) => {
                    eprintln!("warning: no zeroconf announcement: {e:#}");
                    None
                }
            }
        } else {
            None
        };
        let wyoming = server::serve(listener, shared);
        match realtime {
            None => wyoming.await,
            Some((a, rt)) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("listening on {a}"))?;
                eprintln!(
                    "[{:>8.2}s] Realtime API: listening on ws://{}{}",
                    started.elapsed().as_secs_f64(),
                    l.local_addr()?,
                    crate::realtime::server::PATH
                );
                tokio::select! {
                    r = wyoming => r,
                    r = crate::realtime::server::serve(l, rt) => r,
                }
            }
        }
    };
    crate::daemon::shutdown::serve_until_stopped(servers, stop, engine, engine_thread, started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_the_default_port_and_scheme() {
        let p = |s: &str| parse_address(s).map(|a| a.to_string());
        assert_eq!(p("tcp://127.0.0.1:10400").unwrap(), "127.0.0.1:10400");
        assert_eq!(p("tcp://127.0.0.1").unwrap(), "127.0.0.1:10300");
        assert_eq!(p("0.0.0.0").unwrap(), "0.0.0.0:10300");
        assert_eq!(p("tcp://[::1]:0").unwrap(), "[::1]:0");
        assert_eq!(p("::1").unwrap(), "[::1]:10300");
        let e = p("unix:///tmp/x").unwrap_err().to_string();
        assert!(e.contains("unix:// is not supported"), "{e}");
        let e = p("tcp://").unwrap_err().to_string();
        assert!(e.contains("tcp://HOST:PORT"), "{e}");
        assert!(p("tcp://127.0.0.1:99999").is_err());
    }
}
