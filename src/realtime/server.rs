//! The WebSocket server: `GET /v1/realtime`, authentication, limits, one task per connection.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::protocol::{self, Dialect, ProtocolError};
use super::session::{Effect, Session, SessionDefaults};
use crate::engine::{ConvEvent, Conversation, EngineHandle};

/// The endpoint's path.
pub const PATH: &str = "/v1/realtime";

/// What one connection may do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest message (and frame) read; a larger one is answered with a close frame of
    /// code 1009 (message too big) and the connection ends.
    pub max_message_bytes: usize,
    /// A session with no client message for this long (and no reply in progress) is closed.
    pub idle_timeout: Duration,
    /// Sessions open at once; more are refused with 503. A connection takes a session only
    /// once its upgrade succeeded (path and API key checked).
    pub max_sessions: usize,
    /// The time a connection has to complete its WebSocket upgrade.
    pub handshake_timeout: Duration,
    /// Handshakes in progress from one address; a new one beyond this drops the oldest.
    pub max_pending_per_address: usize,
    /// The time one write may wait for a client that does not read; then the session ends and
    /// its reply is cancelled.
    pub write_timeout: Duration,
    /// The kernel's send buffer of a session's socket: what a client that stops reading can
    /// leave queued before the write timeout runs.
    pub send_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // One append of 15 MiB of audio (the reference's limit) in base64, and the event
            // around it.
            max_message_bytes: 21 << 20,
            idle_timeout: Duration::from_secs(600),
            max_sessions: 16,
            handshake_timeout: Duration::from_secs(5),
            max_pending_per_address: 8,
            write_timeout: Duration::from_secs(10),
            send_buffer_bytes: 256 << 10,
        }
    }
}

impl Limits {
    /// The defaults, with the timeouts that `LFM2D_REALTIME_WRITE_TIMEOUT_MS` and
    /// `LFM2D_REALTIME_HANDSHAKE_TIMEOUT_MS` set (for tests of a stalled client).
    pub fn from_env() -> Self {
        let ms = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&v| v > 0)
                .map(Duration::from_millis)
        };
        let mut l = Self::default();
        if let Some(d) = ms("LFM2D_REALTIME_WRITE_TIMEOUT_MS") {
            l.write_timeout = d;
        }
        if let Some(d) = ms("LFM2D_REALTIME_HANDSHAKE_TIMEOUT_MS") {
            l.handshake_timeout = d;
        }
        l
    }
}

/// Handshakes in progress, per source address, oldest first.
#[derive(Default)]
pub struct Pending {
    next: u64,
    by_address: HashMap<IpAddr, VecDeque<(u64, Arc<Notify>)>>,
}

/// A handshake's place in [`Pending`]; leaves it when dropped.
struct PendingGuard<'a> {
    shared: &'a Shared,
    ip: IpAddr,
    id: u64,
    evicted: Arc<Notify>,
}

impl<'a> PendingGuard<'a> {
    /// Registers a handshake from `ip`; the oldest one of that address is told to give up when
    /// there are too many.
    fn new(shared: &'a Shared, ip: IpAddr) -> Self {
        let evicted = Arc::new(Notify::new());
        let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.next += 1;
        let id = p.next;
        let max = shared.limits.max_pending_per_address.max(1);
        let queue = p.by_address.entry(ip).or_default();
        while queue.len() >= max {
            if let Some((_, old)) = queue.pop_front() {
                old.notify_one();
            }
        }
        queue.push_back((id, Arc::clone(&evicted)));
        Self {
            shared,
            ip,
            id,
            evicted,
        }
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = p.by_address.get_mut(&self.ip) {
            queue.retain(|(id, _)| *id != self.id);
            if queue.is_empty() {
                p.by_address.remove(&self.ip);
            }
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
    pub pending: Mutex<Pending>,
    pub next_session: AtomicU64,
    pub started: Instant,
}

impl Shared {
    fn log(&self, line: std::fmt::Arguments) {
        eprintln!("[{:>8.2}s] {line}", self.started.elapsed().as_secs_f64());
    }
}

/// Accepts connections for ever. A failed accept (out of descriptors, a connection reset
/// before it was taken, ...) is temporary: the loop waits a little, longer while the errors go
/// on, and tries again; the sessions it has go on meanwhile. Each burst of errors is logged once.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) -> anyhow::Result<()> {
    let mut failures: u64 = 0;
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if failures > 0 {
                    shared.log(format_args!(
                        "accepting connections again (after {failures} failed accepts)"
                    ));
                    failures = 0;
                    backoff = Duration::from_millis(5);
                }
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    connection(stream, peer, shared).await;
                });
            }
            Err(e) => {
                if failures == 0 {
                    shared.log(format_args!(
                        "cannot accept connections for now ({e}); serving the open sessions and retrying"
                    ));
                }
                failures += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Raises the soft limit of open descriptors to the hard limit (a server holds one per
/// connection); returns the limit in force.
pub fn raise_descriptor_limit() -> Option<libc::rlim_t> {
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(raised.rlim_cur);
            }
        }
        Some(r.rlim_cur)
    }
}

/// Bounds what the kernel queues for a client that stops reading.
fn limit_send_buffer(stream: &TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is the open socket, the option value an int of the size given.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
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
    let mut hello = Hello::default();
    let max = shared.limits.max_message_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let api_key = shared.api_key.clone();
    let limit = shared.limits.max_sessions;
    // The session slot is taken only once the request is known good (path, key).
    let mut permit = None;
    let callback = |req: &Request, resp: Response| {
        let resp = handshake(req, resp, api_key.as_deref(), &mut hello)?;
        match shared.sessions.try_acquire() {
            Ok(p) => {
                permit = Some(p);
                Ok(resp)
            }
            Err(_) => Err(reject(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("lfm2d serves at most {limit} sessions at once; try again later"),
            )),
        }
    };
    let ws = {
        let guard = PendingGuard::new(&shared, peer.ip());
        let upgrade =
            tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
        tokio::select! {
            r = tokio::time::timeout(shared.limits.handshake_timeout, upgrade) => match r {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    shared.log(format_args!("{peer}: handshake refused: {e}"));
                    return;
                }
                Err(_) => return,
            },
            _ = guard.evicted.notified() => return,
        }
    };
    let Some(permit) = permit else {
        return;
    };
    limit_send_buffer(ws.get_ref(), shared.limits.send_buffer_bytes);
    let dialect = hello.dialect.unwrap_or(Dialect::Ga);
    let number = shared.next_session.fetch_add(1, Ordering::SeqCst);
    let (mut session, setup) = Session::new(number, shared.defaults.clone(), dialect);
    let engine = shared.engine.clone();
    let conv = match tokio::task::spawn_blocking(move || engine.open(setup)).await {
        Ok(Ok(conv)) => conv,
        Ok(Err(e)) => {
            shared.log(format_args!("{peer}: could not open a conversation: {e:#}"));
            close_with_error(
                ws,
                dialect,
                &format!("the engine could not open a session: {e:#}"),
                shared.limits.write_timeout,
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
    let reason = run_session(ws, &mut session, conv, &shared).await;
    let summary = match session.speculations() {
        (0, _) => String::new(),
        (n, confirmed) => format!(" (replies started on a pause: {n}, {confirmed} confirmed)"),
    };
    // The slot is free before the line says so: a client that waits for "closed" to open
    // another session must find room.
    drop(permit);
    shared.log(format_args!(
        "{peer}: session {number} closed: {reason}{summary}"
    ));
}

async fn close_with_error(
    mut ws: WebSocketStream<TcpStream>,
    dialect: Dialect,
    message: &str,
    write_timeout: Duration,
) {
    let e = protocol::ServerEvent::Error(ProtocolError::new("server_error", message));
    let _ = send_within(
        &mut ws,
        Message::text(e.to_json(dialect, "event_0").to_string()),
        write_timeout,
    )
    .await;
    let _ = tokio::time::timeout(
        write_timeout,
        ws.close(Some(CloseFrame {
            code: CloseCode::Error,
            reason: "engine unavailable".into(),
        })),
    )
    .await;
}

/// Sends one message, giving up after `limit` (a client that does not read).
async fn send_within(
    ws: &mut WebSocketStream<TcpStream>,
    msg: Message,
    limit: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(limit, ws.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("send failed: {e}")),
        Err(_) => Err(format!(
            "the client read nothing for {:.1} s (write timeout); its reply is cancelled",
            limit.as_secs_f64()
        )),
    }
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

/// Runs one session until the client leaves, goes idle, or the engine stops; says why.
async fn run_session(
    mut ws: WebSocketStream<TcpStream>,
    session: &mut Session,
    conv: Conversation,
    shared: &Shared,
) -> String {
    let mut events = bridge(&conv);
    let mut next_event = 0u64;
    let idle = shared.limits.idle_timeout;
    let write_timeout = shared.limits.write_timeout;
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut effects = session.start();
    loop {
        for effect in effects.drain(..) {
            match effect {
                Effect::Send(ev) if !ev.exists_in(session.dialect()) => {}
                Effect::Send(ev) => {
                    next_event += 1;
                    let text = ev
                        .to_json(session.dialect(), &format!("event_{next_event}"))
                        .to_string();
                    if let Err(e) = send_within(&mut ws, Message::text(text), write_timeout).await {
                        return e;
                    }
                }
                Effect::Engine(call) => conv.apply(call),
            }
        }
        tokio::select! {
            msg = ws.next() => {
                deadline = tokio::time::Instant::now() + idle;
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        effects = match protocol::parse(text.as_str()) {
                            Ok(env) => session.handle_client(env),
                            Err(e) => session.reject(e),
                        };
                    }
                    Some(Ok(Message::Binary(_))) => {
                        effects = session.reject(ProtocolError::new(
                            "invalid_event",
                            "binary frames are not part of the protocol: send JSON events as text frames",
                        ));
                    }
                    Some(Ok(Message::Close(_))) => {
                        // The close frame in reply is queued; it goes out with a flush.
                        let _ = tokio::time::timeout(write_timeout, ws.flush()).await;
                        return "the client left".into();
                    }
                    None => return "the client left".into(),
                    Some(Ok(_)) => {}
                    Some(Err(WsError::Capacity(e))) => {
                        let reason = format!(
                            "a message over {} bytes: {e}",
                            shared.limits.max_message_bytes
                        );
                        let _ = tokio::time::timeout(
                            write_timeout,
                            ws.close(Some(CloseFrame {
                                code: CloseCode::Size,
                                reason: "message too big".into(),
                            })),
                        )
                        .await;
                        return reason;
                    }
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
                                if send_within(&mut ws, Message::text(text), write_timeout).await.is_err() {
                                    break;
                                }
                            }
                        }
                        let _ = tokio::time::timeout(write_timeout, ws.close(Some(CloseFrame { code: CloseCode::Error, reason: "engine stopped".into() }))).await;
                        return "the engine stopped".into();
                    }
                };
            }
            _ = tokio::time::sleep_until(deadline) => {
                if session.busy() {
                    deadline = tokio::time::Instant::now() + idle;
                    effects = Vec::new();
                } else {
                    let _ = tokio::time::timeout(write_timeout, ws.close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: format!("idle for {} s", idle.as_secs()).into(),
                    }))).await;
                    return "idle timeout".into();
                }
            }
        }
    }
}
