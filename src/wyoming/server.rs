//! The Wyoming TCP server: one task per connection around a [`Session`], engine work on blocking
//! threads, conversations shared by id across connections, limits and timeouts. The engine runs
//! the conversations' tools (on threads of their own, see [`crate::engine`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use dialog::rounds::{RoundEnd, Rounds};
use dialog::tools::ToolSpec;
use lfm2_audio::generate::GenerationParams;
use lfm2_audio::sampling::SamplingParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::protocol::{self, error_event, Event, Resync};
use super::session::{Effect, Offer, Session, Work};
use crate::engine::{Conversation, EngineHandle, Setup};
use crate::voices::Voice;
use dialog::conversation::{Content, ConvEvent, Output, Respond, ToolPolicy};

/// What connections may do.
#[derive(Debug, Clone)]
pub struct Limits {
    pub protocol: protocol::Limits,
    /// Connections served at once; more are answered with an error and closed.
    pub max_connections: usize,
    /// A connection with nothing to do and no event for this long is closed.
    pub idle_timeout: Duration,
    /// An event begun must be complete within this time.
    pub event_timeout: Duration,
    /// A write to a client that does not read gives up after this time.
    pub write_timeout: Duration,
    /// Bad events in a row before the connection is closed.
    pub max_errors_in_a_row: usize,
    /// Conversations kept (the least recently used one goes first) and how long an unused one
    /// stays.
    pub max_conversations: usize,
    pub conversation_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            protocol: protocol::Limits::default(),
            max_connections: 16,
            idle_timeout: Duration::from_secs(300),
            event_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_errors_in_a_row: 16,
            max_conversations: 8,
            conversation_ttl: Duration::from_secs(1800),
        }
    }
}

/// A conversation of the agent, kept across requests by its id.
struct Slot {
    conv: Conversation,
    last_used: Instant,
    turns: u64,
}

/// Everything connections share.
pub struct Shared {
    pub engine: EngineHandle,
    pub offer: Offer,
    pub voices: Vec<Voice>,
    pub params: GenerationParams,
    /// The conversation agent's system prompt and tools.
    pub instructions: String,
    pub tools: Vec<ToolSpec>,
    pub limits: Limits,
    pub started: Instant,
    connections: Arc<Semaphore>,
    conversations: Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
    next_connection: AtomicU64,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: EngineHandle,
        offer: Offer,
        voices: Vec<Voice>,
        params: GenerationParams,
        instructions: String,
        tools: Vec<ToolSpec>,
        limits: Limits,
        started: Instant,
    ) -> Self {
        Self {
            engine,
            offer,
            voices,
            params,
            instructions,
            tools,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            started,
            conversations: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
        }
    }

    pub fn log(&self, line: std::fmt::Arguments) {
        eprintln!(
            "[{:>8.2}s] wyoming: {line}",
            self.started.elapsed().as_secs_f64()
        );
    }

    /// The agent's conversation `id`, opened when new (dropping the least recently used one
    /// when there are too many).
    fn conversation(&self, id: &str) -> anyhow::Result<Arc<Mutex<Slot>>> {
        if let Some(slot) = lock(&self.conversations).get(id) {
            return Ok(Arc::clone(slot));
        }
        let conv = self.engine.open(Setup {
            instructions: self.instructions.clone(),
            tools: self.tools.clone(),
            tool_policy: self.offer.tool_policy(),
            params: self.params,
            output: Output::Text,
        })?;
        let mut map = lock(&self.conversations);
        if let Some(slot) = map.get(id) {
            // Opened meanwhile by another connection.
            return Ok(Arc::clone(slot));
        }
        let ttl = self.limits.conversation_ttl;
        // Idle ones past their time go; then the least recently used until there is room. One
        // in use (held by a request) is never dropped.
        let free = |s: &Arc<Mutex<Slot>>| Arc::strong_count(s) == 1;
        map.retain(|_, s| !(free(s) && lock(s).last_used.elapsed() > ttl));
        while map.len() >= self.limits.max_conversations {
            let oldest = map
                .iter()
                .filter(|(_, s)| free(s))
                .min_by_key(|(_, s)| lock(s).last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    map.remove(&k);
                }
                None => anyhow::bail!(
                    "{} conversations are in use at once; try again later",
                    map.len()
                ),
            }
        }
        let slot = Arc::new(Mutex::new(Slot {
            conv,
            last_used: Instant::now(),
            turns: 0,
        }));
        map.insert(id.to_owned(), Arc::clone(&slot));
        Ok(slot)
    }
}

/// A poisoned lock only means a panic elsewhere; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the engine side tells a connection.
enum Msg {
    Engine(ConvEvent),
    Failed(String),
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait and go on.
                shared.log(format_args!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            connection(stream, peer, shared).await;
        });
    }
}

async fn write_event(w: &mut OwnedWriteHalf, ev: &Event, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, w.write_all(&ev.encode())).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err(format!(
            "the client read nothing for {} s",
            timeout.as_secs()
        )),
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let (mut rd, mut wr) = stream.into_split();
    let Ok(permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
        let e = error_event(
            "too_many_connections",
            format!(
                "lfm2d serves at most {} Wyoming connections at once; try again later",
                shared.limits.max_connections
            ),
        );
        let _ = write_event(&mut wr, &e, Duration::from_secs(2)).await;
        let _ = wr.shutdown().await;
        shared.log(format_args!("{peer}: refused (too many connections)"));
        return;
    };
    let number = shared.next_connection.fetch_add(1, Ordering::SeqCst);
    let session = Session::new(shared.offer.clone(), number);
    let reason = run_connection(&mut rd, &mut wr, session, number, &shared).await;
    let _ = wr.shutdown().await;
    shared.log(format_args!("{peer}: connection {number} closed: {reason}"));
    drop(permit);
}

async fn run_connection(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    mut session: Session,
    number: u64,
    shared: &Arc<Shared>,
) -> String {
    let limits = &shared.limits;
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Msg)>();
    let mut buf: Vec<u8> = Vec::new();
    let mut skip = 0usize;
    let mut errors = 0usize;
    let mut partial_since: Option<tokio::time::Instant> = None;
    let mut last_activity = tokio::time::Instant::now();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Every whole event in the buffer.
        let mut effects = Vec::new();
        loop {
            if skip > 0 {
                let n = skip.min(buf.len());
                buf.drain(..n);
                skip -= n;
                if skip > 0 {
                    break;
                }
            }
            if buf.is_empty() {
                break;
            }
            match protocol::parse_event(&buf, &limits.protocol) {
                Ok(Some((ev, used))) => {
                    buf.drain(..used);
                    errors = 0;
                    effects.extend(session.handle_client(ev));
                }
                Ok(None) => break,
                Err(e) => {
                    if e.code != "empty_line" {
                        errors += 1;
                        effects.push(Effect::Send(error_event(e.code, e.message.clone())));
                    }
                    match e.resync {
                        Resync::Skip(n) => skip = n.max(1),
                        Resync::Close => {
                            apply(effects, wr, &tx, shared, number).await.ok();
                            return format!("unreadable stream: {}", e.message);
                        }
                    }
                    if errors >= limits.max_errors_in_a_row {
                        apply(effects, wr, &tx, shared, number).await.ok();
                        return format!("{errors} bad events in a row");
                    }
                }
            }
        }
        if let Err(e) = apply(effects, wr, &tx, shared, number).await {
            return e;
        }
        let partial = !buf.is_empty() || skip > 0;
        if !partial {
            partial_since = None;
        } else if partial_since.is_none() {
            partial_since = Some(tokio::time::Instant::now());
        }
        let deadline = match partial_since {
            Some(t) => t + limits.event_timeout,
            None => last_activity + limits.idle_timeout,
        };
        tokio::select! {
            read = rd.read(&mut chunk) => match read {
                Ok(0) => return "the client left".into(),
                Ok(n) => {
                    last_activity = tokio::time::Instant::now();
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) => return format!("read failed: {e}"),
            },
            Some((job, msg)) = rx.recv() => {
                last_activity = tokio::time::Instant::now();
                let effects = match msg {
                    Msg::Engine(ev) => session.handle_engine(job, ev),
                    Msg::Failed(m) => session.work_failed(job, &m),
                };
                if let Err(e) = apply(effects, wr, &tx, shared, number).await {
                    return e;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                if partial_since.is_some() {
                    let e = error_event("timeout", format!(
                        "an event was begun but not finished within {} s; closing",
                        limits.event_timeout.as_secs()
                    ));
                    let _ = write_event(wr, &e, Duration::from_secs(2)).await;
                    return "an event was left half sent".into();
                }
                if session.busy() {
                    last_activity = tokio::time::Instant::now();
                } else {
                    return format!("idle for {} s", limits.idle_timeout.as_secs());
                }
            }
        }
    }
}

async fn apply(
    effects: Vec<Effect>,
    wr: &mut OwnedWriteHalf,
    tx: &mpsc::UnboundedSender<(u64, Msg)>,
    shared: &Arc<Shared>,
    number: u64,
) -> Result<(), String> {
    for effect in effects {
        match effect {
            Effect::Send(ev) => write_event(wr, &ev, shared.limits.write_timeout).await?,
            Effect::Log(line) => shared.log(format_args!("{line}")),
            Effect::Engine(work) => {
                let shared = Arc::clone(shared);
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || run_work(&shared, number, work, &tx));
            }
        }
    }
    Ok(())
}

/// Forwards a conversation's events for one piece of work until `last` says it is over. When the
/// connection is gone the reply is cancelled (and still waited for, so that the conversation is
/// left in order).
fn forward(
    conv: &Conversation,
    job: u64,
    tx: &mpsc::UnboundedSender<(u64, Msg)>,
    mine: impl Fn(&ConvEvent) -> bool,
    mut last: impl FnMut(&ConvEvent) -> bool,
) {
    let mut cancelled = false;
    loop {
        if !cancelled && tx.is_closed() {
            conv.cancel(None);
            cancelled = true;
        }
        match conv.events().recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => {
                if !mine(&ev) {
                    continue;
                }
                let end = last(&ev);
                let _ = tx.send((job, Msg::Engine(ev)));
                if end {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = tx.send((job, Msg::Failed("the engine has stopped".into())));
                return;
            }
        }
    }
}

/// Runs one piece of work (on a blocking thread).
fn run_work(shared: &Shared, number: u64, work: Work, tx: &mpsc::UnboundedSender<(u64, Msg)>) {
    let fail = |job: u64, e: anyhow::Error| {
        let _ = tx.send((job, Msg::Failed(format!("{e:#}"))));
    };
    match work {
        Work::Transcribe { job, audio } => {
            let conv = match shared.engine.open(Setup {
                instructions: String::new(),
                tools: Vec::new(),
                tool_policy: ToolPolicy::Report,
                params: shared.params,
                output: Output::Text,
            }) {
                Ok(c) => c,
                Err(e) => return fail(job, e),
            };
            let item = format!("wy{number}-{job}-audio");
            conv.transcribe_streaming(item.clone(), audio);
            forward(
                &conv,
                job,
                tx,
                |ev| {
                    matches!(
                        ev,
                        ConvEvent::TranscriptDelta { .. }
                            | ConvEvent::Transcript { .. }
                            | ConvEvent::Error { .. }
                    )
                },
                |ev| !matches!(ev, ConvEvent::TranscriptDelta { .. }),
            );
        }
        Work::Speak { job, text, voice } => {
            let Some(v) = shared.voices.iter().find(|v| v.name == voice) else {
                return fail(job, anyhow::anyhow!("unknown voice {voice:?}"));
            };
            let mut params = shared.params;
            params.audio = SamplingParams::new(v.audio_temperature, v.audio_top_k);
            let conv = match shared.engine.open(Setup {
                instructions: v.system_prompt.clone(),
                tools: Vec::new(),
                tool_policy: ToolPolicy::Report,
                params,
                output: Output::Tts,
            }) {
                Ok(c) => c,
                Err(e) => return fail(job, e),
            };
            let rid = format!("wy{number}-{job}");
            conv.add(format!("{rid}-text"), Content::UserText(text));
            conv.respond(Respond {
                response_id: rid.clone(),
                item_id: format!("{rid}-speech"),
                output: None,
            });
            forward(
                &conv,
                job,
                tx,
                |ev| ev.response_id().is_some() || matches!(ev, ConvEvent::Error { .. }),
                |ev| matches!(ev, ConvEvent::ReplyDone { .. }),
            );
        }
        Work::Converse {
            job,
            conversation_id,
            text,
        } => {
            let slot = match shared.conversation(&conversation_id) {
                Ok(s) => s,
                Err(e) => return fail(job, e),
            };
            let mut slot = lock(&slot);
            // What an abandoned request left behind.
            while slot.conv.events().try_recv().is_ok() {}
            slot.turns += 1;
            shared.log(format_args!(
                "conversation {conversation_id:?}: turn {}",
                slot.turns
            ));
            let rid = format!("wy{number}-{job}");
            slot.conv
                .add(format!("{rid}-user"), Content::UserText(text));
            converse(&slot.conv, job, &rid, shared.offer.tool_policy(), tx);
            slot.last_used = Instant::now();
        }
    }
}

/// Asks the agent's conversation for a reply and forwards it, all its rounds (the engine runs
/// the tools it calls and the model answers in the next round).
fn converse(
    conv: &Conversation,
    job: u64,
    rid: &str,
    policy: ToolPolicy,
    tx: &mpsc::UnboundedSender<(u64, Msg)>,
) {
    conv.respond(Respond {
        response_id: rid.to_owned(),
        item_id: format!("{rid}-reply"),
        output: None,
    });
    let mut rounds = Rounds::new(policy);
    // The request's items: `{rid}-user`, and the rounds' `{rid}-reply`, `{rid}-reply-N` and
    // `{rid}-reply-result-…`.
    let prefix = format!("{rid}-");
    forward(
        conv,
        job,
        tx,
        |ev| match ev {
            ConvEvent::Error { item_id, .. } => {
                item_id.as_deref().is_none_or(|i| i.starts_with(&prefix))
            }
            _ => ev.response_id() == Some(rid),
        },
        |ev| matches!(rounds.event(ev), Some(RoundEnd::Over(_))),
    );
}
