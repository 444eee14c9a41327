//! The WebSocket server: `GET /v1/realtime`, authentication, limits, one task per connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::protocol::{self, Dialect, ProtocolError};
use super::session::{Effect, EngineCall, Session, SessionDefaults};
use crate::engine::{ConvEvent, Conversation, EngineHandle};

/// The endpoint's path.
pub const PATH: &str = "/v1/realtime";

/// What one connection may do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest text frame handled; a larger one (up to twice this) is answered with an
    /// `error` event, anything larger closes the connection (1009).
    pub max_message_bytes: usize,
    /// A session with no client message for this long (and no reply in progress) is closed.
    pub idle_timeout: Duration,
    /// Sessions open at once; more are refused with 503.
    pub max_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 8 << 20,
            idle_timeout: Duration::from_secs(600),
            max_sessions: 16,
        }
    }
}

/// Everything connections share.
pub struct Shared {
    pub engine: EngineHandle,
    pub defaults: SessionDefaults,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub sessions: Semaphore,
    pub next_session: AtomicU64,
    pub started: Instant,
}

impl Shared {
    fn log(&self, line: std::fmt::Arguments) {
        eprintln!("[{:>8.2}s] {line}", self.started.elapsed().as_secs_f64());
    }
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            connection(stream, peer, shared).await;
        });
    }
}

/// Equal in constant time for equal lengths.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn reject(status: StatusCode, message: &str) -> ErrorResponse {
    let body = serde_json::json!({"error": {"type": "invalid_request_error", "message": message}})
        .to_string();
    let mut r = ErrorResponse::new(Some(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// What the handshake learned.
#[derive(Default)]
struct Hello {
    dialect: Option<Dialect>,
}

/// Checks the path and the key, picks the dialect and the subprotocol.
// The error type is tungstenite's handshake callback contract.
#[allow(clippy::result_large_err)]
fn handshake(
    req: &Request,
    mut resp: Response,
    api_key: Option<&str>,
    hello: &mut Hello,
) -> Result<Response, ErrorResponse> {
    if req.uri().path() != PATH {
        return Err(reject(
            StatusCode::NOT_FOUND,
            &format!("not found: lfm2d serves the Realtime API at {PATH}"),
        ));
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    // Browsers cannot set headers on a WebSocket: they pass the key and the beta flag as
    // subprotocols (`realtime, openai-insecure-api-key.KEY, openai-beta.realtime-v1`).
    let protocols: Vec<&str> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if let Some(key) = api_key {
        let bearer = header("authorization").and_then(|v| v.strip_prefix("Bearer "));
        let given = bearer.or_else(|| header("api-key")).or_else(|| {
            protocols
                .iter()
                .find_map(|p| p.strip_prefix("openai-insecure-api-key."))
        });
        if !given.is_some_and(|g| same_key(g.trim(), key)) {
            return Err(reject(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send `Authorization: Bearer KEY`",
            ));
        }
    }
    let beta = header("openai-beta").is_some_and(|v| v.contains("realtime=v1"))
        || protocols.contains(&"openai-beta.realtime-v1");
    hello.dialect = Some(if beta { Dialect::Beta } else { Dialect::Ga });
    if let Some(chosen) = protocols
        .iter()
        .find(|p| **p == "realtime")
        .or(protocols.first())
    {
        if let Ok(v) = HeaderValue::from_str(chosen) {
            resp.headers_mut().insert("sec-websocket-protocol", v);
        }
    }
    Ok(resp)
}

// The handshake callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let permit = shared.sessions.try_acquire();
    let full = permit.is_err();
    let mut hello = Hello::default();
    let max = shared.limits.max_message_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max.saturating_mul(2)))
        .max_frame_size(Some(max.saturating_mul(2)));
    let api_key = shared.api_key.clone();
    let limit = shared.limits.max_sessions;
    let callback = |req: &Request, resp: Response| {
        if full {
            return Err(reject(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("lfm2d serves at most {limit} sessions at once; try again later"),
            ));
        }
        handshake(req, resp, api_key.as_deref(), &mut hello)
    };
    let ws = match tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
    {
        Ok(ws) => ws,
        Err(e) => {
            shared.log(format_args!("{peer}: handshake refused: {e}"));
            return;
        }
    };
    let dialect = hello.dialect.unwrap_or(Dialect::Ga);
    let number = shared.next_session.fetch_add(1, Ordering::SeqCst);
    let (session, setup) = Session::new(number, shared.defaults.clone(), dialect);
    let engine = shared.engine.clone();
    let conv = match tokio::task::spawn_blocking(move || engine.open(setup)).await {
        Ok(Ok(conv)) => conv,
        Ok(Err(e)) => {
            shared.log(format_args!("{peer}: could not open a conversation: {e:#}"));
            close_with_error(
                ws,
                dialect,
                &format!("the engine could not open a session: {e:#}"),
            )
            .await;
            return;
        }
        Err(e) => {
            shared.log(format_args!("{peer}: {e}"));
            return;
        }
    };
    shared.log(format_args!(
        "{peer}: session {number} open ({dialect:?} dialect)"
    ));
    let reason = run_session(ws, session, conv, &shared).await;
    shared.log(format_args!("{peer}: session {number} closed: {reason}"));
    drop(permit);
}

async fn close_with_error(mut ws: WebSocketStream<TcpStream>, dialect: Dialect, message: &str) {
    let e = protocol::ServerEvent::Error(ProtocolError::new("server_error", message));
    let _ = ws
        .send(Message::text(e.to_json(dialect, "event_0").to_string()))
        .await;
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Error,
            reason: "engine unavailable".into(),
        }))
        .await;
}

/// Forwards the conversation's events (a crossbeam channel) into the async world.
fn bridge(conv: &Conversation) -> mpsc::UnboundedReceiver<ConvEvent> {
    let rx = conv.events().clone();
    let (tx, out) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("realtime-events".into())
        .spawn(move || {
            for ev in rx.iter() {
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("realtime: could not start an event thread: {e}");
    }
    out
}

fn apply_engine(conv: &Conversation, call: EngineCall) {
    match call {
        EngineCall::Configure(setup) => conv.configure(setup),
        EngineCall::Add { item_id, content } => conv.add(item_id, content),
        EngineCall::Respond(r) => conv.respond(r),
        EngineCall::Cancel { heard } => conv.cancel(heard),
        EngineCall::Truncate {
            item_id,
            audio_samples,
        } => conv.truncate(item_id, audio_samples),
        EngineCall::Delete { item_id } => conv.delete(item_id),
        EngineCall::Transcribe { item_id, audio } => conv.transcribe(item_id, audio),
    }
}

/// Runs one session until the client leaves, goes idle, or the engine stops; says why.
async fn run_session(
    mut ws: WebSocketStream<TcpStream>,
    mut session: Session,
    conv: Conversation,
    shared: &Shared,
) -> String {
    let mut events = bridge(&conv);
    let mut next_event = 0u64;
    let idle = shared.limits.idle_timeout;
    let max = shared.limits.max_message_bytes;
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut effects = session.start();
    loop {
        for effect in effects.drain(..) {
            match effect {
                Effect::Send(ev) => {
                    next_event += 1;
                    let text = ev
                        .to_json(session.dialect(), &format!("event_{next_event}"))
                        .to_string();
                    if let Err(e) = ws.send(Message::text(text)).await {
                        return format!("send failed: {e}");
                    }
                }
                Effect::Engine(call) => apply_engine(&conv, call),
            }
        }
        tokio::select! {
            msg = ws.next() => {
                deadline = tokio::time::Instant::now() + idle;
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        effects = if text.len() > max {
                            session.reject(ProtocolError::new(
                                "message_too_large",
                                format!("the message has {} bytes; the limit is {max} (send audio in smaller appends)", text.len()),
                            ))
                        } else {
                            match protocol::parse(text.as_str()) {
                                Ok(env) => session.handle_client(env),
                                Err(e) => session.reject(e),
                            }
                        };
                    }
                    Some(Ok(Message::Binary(_))) => {
                        effects = session.reject(ProtocolError::new(
                            "invalid_event",
                            "binary frames are not part of the protocol: send JSON events as text frames",
                        ));
                    }
                    Some(Ok(Message::Close(_))) | None => return "the client left".into(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return format!("read failed: {e}"),
                }
            }
            ev = events.recv() => {
                effects = match ev {
                    Some(ev) => session.handle_engine(ev),
                    None => {
                        let out = session.engine_gone();
                        for effect in out {
                            if let Effect::Send(ev) = effect {
                                next_event += 1;
                                let text = ev.to_json(session.dialect(), &format!("event_{next_event}")).to_string();
                                let _ = ws.send(Message::text(text)).await;
                            }
                        }
                        let _ = ws.close(Some(CloseFrame { code: CloseCode::Error, reason: "engine stopped".into() })).await;
                        return "the engine stopped".into();
                    }
                };
            }
            _ = tokio::time::sleep_until(deadline) => {
                if session.busy() {
                    deadline = tokio::time::Instant::now() + idle;
                    effects = Vec::new();
                } else {
                    let _ = ws.close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: format!("idle for {} s", idle.as_secs()).into(),
                    })).await;
                    return "idle timeout".into();
                }
            }
        }
    }
}
