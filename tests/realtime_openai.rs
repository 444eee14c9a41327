//! `lfm2d serve --listen`: the OpenAI-Realtime-compatible WebSocket API, driven by the official
//! `openai` Python package (tests/realtime/client_test.py) against the tiny-c fixture model, plus
//! the HTTP side (path, API key, refusing a public address without a key) from Rust.
//!
//! The Python client lives in `.venv-rt/` (made by `tools/setup.sh`). Without it the client test
//! is skipped loudly, except in CI (`CI` set), where it fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The seam that makes the first reply of a session with tools a tool call.
const FORCED_TOOL_CALL: &str = r#"<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>"#;

/// A running `lfm2d serve --listen 127.0.0.1:0`, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_limited(extra, env, None)
    }

    /// With `ulimit` (arguments of the shell's `ulimit`, such as `-n 128`), the server runs
    /// under that descriptor limit.
    fn start_limited(extra: &[&str], env: &[(&str, &str)], ulimit: Option<&str>) -> Self {
        let model = root().join("tests/fixtures/tiny-c/model");
        let mut cmd = match ulimit {
            Some(limit) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_lfm2d"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_lfm2d")),
        };
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--model"])
            .arg(&model)
            .args(["--quant", "f32"])
            .args(extra)
            .env_remove("LFM2D_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("lfm2d starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match log.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ws://127.0.0.1:").nth(1) {
                        let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                        break port.parse().expect("a port");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("the server did not start listening within 60 s");
                }
            }
        };
        Self { child, port, log }
    }
}

impl Server {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `within` for a log line containing `needle`.
    fn wait_log(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while self.log.try_recv().is_ok() {}
    }
}

/// Sends a WebSocket upgrade request for `path` with `headers` and returns the status line.
fn upgrade(port: u16, path: &str, headers: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_public_address_needs_an_api_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_lfm2d"))
        .args(["serve", "--listen", "0.0.0.0:0", "--model", "/nonexistent"])
        .env_remove("LFM2D_API_KEY")
        .output()
        .expect("lfm2d runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-key"), "{err}");
}

#[test]
fn the_endpoint_checks_its_path_and_the_api_key() {
    let server = Server::start(&["--api-key", "s3cret"], &[]);
    let p = server.port;
    assert!(upgrade(p, "/v1/realtime", &[]).contains("401"));
    assert!(upgrade(p, "/v1/realtime", &["Authorization: Bearer wrong"]).contains("401"));
    assert!(upgrade(p, "/v1/other", &["Authorization: Bearer s3cret"]).contains("404"));
    assert!(upgrade(p, "/v1/realtime?model=x", &["Authorization: Bearer s3cret"]).contains("101"));
    // Browsers pass the key as a subprotocol.
    let status = upgrade(
        p,
        "/v1/realtime",
        &["Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.s3cret, openai-beta.realtime-v1"],
    );
    assert!(status.contains("101"), "{status}");
}

/// Runs `script PORT [args]` with the Python of `venv` against `server`; returns its output
/// once it has passed (None when skipped). Without the venv the test is skipped loudly, except
/// in CI.
fn run_client(
    venv: &str,
    script: &str,
    server: &Server,
    args: &[PathBuf],
    limit: Duration,
) -> Option<String> {
    let python = root().join(venv).join("bin/python");
    if !python.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: tools/setup.sh makes it",
            python.display()
        );
        eprintln!(
            "\n*** SKIPPED {script}: no {} (run tools/setup.sh)\n",
            python.display()
        );
        return None;
    }
    let mut client = Command::new(&python)
        .arg(root().join("tests/realtime").join(script))
        .arg(server.port.to_string())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    // Read both pipes as the client writes (pipecat logs a lot).
    let mut out_pipe = client.stdout.take().unwrap();
    let mut err_pipe = client.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = client.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    eprintln!("client stdout:\n{out}\nclient stderr:\n{err}");
    let status = status.unwrap_or_else(|| panic!("{script} did not finish within {limit:?}"));
    assert!(status.success(), "{script} failed: {err}");
    assert!(out.contains("all parts passed"), "{out}");
    Some(out)
}

#[test]
fn the_official_openai_client_talks_to_lfm2d() {
    let server = Server::start(&[], &[("LFM2D_FORCE_REPLY", FORCED_TOOL_CALL)]);
    run_client(
        ".venv-rt",
        "client_test.py",
        &server,
        &[root().join("tests/fixtures/audio/what_time_16k.wav")],
        Duration::from_secs(120),
    );
}

/// A server-VAD turn gives the official client the same events, ids, words and speech whether
/// the server starts the reply when the user pauses (`assistant.speculative_start`) or at the
/// end of the silence. The question comes twice with a short pause between: a reply started on
/// that pause is dropped unseen, and the one started on the last pause is confirmed. Speech is
/// sampled greedily in both, so that the comparison is exact.
#[test]
fn a_reply_started_on_the_pause_is_the_reply_started_at_the_end() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let turn = |speculate: bool| -> Option<(serde_json::Value, String)> {
        let config = dir.path().join(format!("speculate-{speculate}.toml"));
        std::fs::write(
            &config,
            format!("[assistant]\nspeculative_start = {speculate}\n\n[sampling]\naudio_temperature = 0.0\n"),
        )
        .expect("the configuration is written");
        let server = Server::start(&["--config", config.to_str().expect("a UTF-8 path")], &[]);
        let out = run_client(
            ".venv-rt",
            "speculative_test.py",
            &server,
            &[root().join("tests/fixtures/audio/what_time_16k.wav")],
            Duration::from_secs(120),
        )?;
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("TURN "))
            .unwrap_or_else(|| panic!("no TURN line in {out}"));
        let seen = serde_json::from_str(line).expect("the client's JSON");
        let closed = server
            .wait_log("closed:", Duration::from_secs(20))
            .expect("the session is closed");
        Some((seen, closed))
    };
    let Some((plain, plain_log)) = turn(false) else {
        return;
    };
    let Some((spec, spec_log)) = turn(true) else {
        return;
    };
    assert!(!plain_log.contains("on a pause"), "{plain_log}");
    assert!(
        spec_log.contains(", 1 confirmed)"),
        "the reply was started on the last pause: {spec_log}"
    );
    let started: u32 = spec_log
        .split("on a pause: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        started >= 2,
        "a reply was started on the pause between the questions and dropped: {spec_log}"
    );
    assert_eq!(spec, plain, "the client sees the same turn");
}

/// Three sessions of the official client at once: their replies are generated together, and
/// none waits for another to end (tests/realtime/concurrent_test.py checks the order).
#[test]
fn three_sessions_share_the_engine_and_no_reply_waits_for_another() {
    let server = Server::start(&[], &[]);
    run_client(
        ".venv-rt",
        "concurrent_test.py",
        &server,
        &[],
        Duration::from_secs(180),
    );
}

/// pipecat-ai's OpenAI Realtime LLM service in a pipeline: a turn, and a tool call that pipecat
/// runs and answers.
#[test]
fn pipecat_runs_a_turn_and_a_tool_call_against_lfm2d() {
    let server = Server::start(&[], &[("LFM2D_FORCE_REPLY", FORCED_TOOL_CALL)]);
    run_client(
        ".venv-pipecat",
        "pipecat_test.py",
        &server,
        &[],
        Duration::from_secs(120),
    );
}

/// LiveKit Agents' OpenAI RealtimeModel pointed at lfm2d (`base_url`): a turn, and a tool call
/// whose output goes back in the chat context.
#[test]
fn livekit_agents_realtime_model_runs_a_turn_and_a_tool_call_against_lfm2d() {
    let server = Server::start(&[], &[("LFM2D_FORCE_REPLY", FORCED_TOOL_CALL)]);
    run_client(
        ".venv-livekit",
        "livekit_test.py",
        &server,
        &[],
        Duration::from_secs(120),
    );
}

/// The time a good client takes to be upgraded (101) while others misbehave.
fn timed_upgrade(port: u16, headers: &[&str]) -> (String, Duration) {
    let t = Instant::now();
    let status = upgrade(port, "/v1/realtime", headers);
    (status, t.elapsed())
}

/// Whether the server has closed `s` (reads end of stream or a reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[test]
fn idle_half_open_and_unauthenticated_connections_do_not_lock_clients_out() {
    let server = Server::start(
        &["--api-key", "s3cret"],
        &[("LFM2D_REALTIME_HANDSHAKE_TIMEOUT_MS", "2000")],
    );
    let p = server.port;
    let mut hostile = Vec::new();
    // More idle connections than there are sessions (16), a few half-open requests, and
    // upgrades with a wrong key that then stay open.
    for _ in 0..40 {
        hostile.push(TcpStream::connect(("127.0.0.1", p)).unwrap());
    }
    for _ in 0..10 {
        let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        s.write_all(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websock")
            .unwrap();
        hostile.push(s);
    }
    for _ in 0..20 {
        assert!(upgrade(p, "/v1/realtime", &["Authorization: Bearer nope"]).contains("401"));
    }
    let (status, took) = timed_upgrade(p, &["Authorization: Bearer s3cret"]);
    assert!(status.contains("101"), "{status}");
    assert!(took < Duration::from_secs(1), "upgraded after {took:?}");
    // (That client has gone; its session ends.)
    assert!(server
        .wait_log("session 1 closed", Duration::from_secs(10))
        .is_some());
    // Sixteen good sessions can be open at once whatever the others do; the 17th is refused.
    let mut sessions = Vec::new();
    for i in 0..16 {
        let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        let req =
            "GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer s3cret\r\n\r\n";
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 101"), "session {i}: {head}");
        sessions.push(s);
    }
    assert!(upgrade(p, "/v1/realtime", &["Authorization: Bearer s3cret"]).contains("503"));
    drop(sessions);
    // The idle and half-open connections are closed once the handshake time is over (or were
    // dropped earlier to make room for newer handshakes from the same address).
    for s in hostile.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(6)),
            "a hostile connection stays open"
        );
    }
    let (status, took) = timed_upgrade(p, &["Authorization: Bearer s3cret"]);
    assert!(status.contains("101"), "{status}");
    assert!(took < Duration::from_secs(1), "upgraded after {took:?}");
}

/// Opens `n` TCP connections from many loopback addresses (system python3; no package).
fn many_connections(port: u16, n: usize, hold: Duration) -> Child {
    let script = format!(
        "import socket, sys, time\n\
         socks = []\n\
         for i in range({n}):\n\
         \x20   s = socket.socket()\n\
         \x20   s.bind(('127.0.%d.%d' % (1 + i // 200, 2 + i % 200), 0))\n\
         \x20   s.settimeout(2)\n\
         \x20   try:\n\
         \x20       s.connect(('127.0.0.1', {port}))\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         \x20   socks.append(s)\n\
         print('open', len(socks), flush=True)\n\
         time.sleep({})\n",
        hold.as_secs_f64()
    );
    Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs")
}

#[test]
fn running_out_of_descriptors_does_not_stop_the_server() {
    let mut server = Server::start_limited(
        &[],
        &[("LFM2D_REALTIME_HANDSHAKE_TIMEOUT_MS", "3000")],
        Some("-n 128"),
    );
    let p = server.port;
    let mut crowd = many_connections(p, 200, Duration::from_secs(4));
    let mut line = String::new();
    BufReader::new(crowd.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("open 200"), "{line}");
    assert!(
        server
            .wait_log("cannot accept connections for now", Duration::from_secs(10))
            .is_some(),
        "the server did not run out of descriptors (the test is not testing anything)"
    );
    assert!(
        server.running(),
        "the server exited when out of descriptors"
    );
    let _ = crowd.wait();
    // Once the crowd is gone, clients are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = upgrade(p, "/v1/realtime", &[]);
        if status.contains("101") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no upgrade after the crowd left: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server.running());
}

/// The soft descriptor limit of process `pid` and its hard limit.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let mut f = line.split_whitespace().skip(3);
    (
        f.next().unwrap_or_default().to_owned(),
        f.next().unwrap_or_default().to_owned(),
    )
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
    let server = Server::start_limited(&[], &[], Some("-Sn 128 && ulimit -Hn 4096"));
    let (soft, hard) = open_files_limits(server.child.id());
    assert_eq!(hard, "4096");
    assert_eq!(soft, hard, "the soft limit was not raised");
}

/// A sync WebSocket client on the Realtime endpoint.
fn ws_connect(port: u16) -> tokio_tungstenite::tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let (ws, _) = tokio_tungstenite::tungstenite::client::client(
        format!("ws://127.0.0.1:{port}/v1/realtime"),
        stream,
    )
    .expect("upgrade");
    ws
}

fn ws_send(ws: &mut tokio_tungstenite::tungstenite::WebSocket<TcpStream>, v: serde_json::Value) {
    ws.send(tokio_tungstenite::tungstenite::Message::text(v.to_string()))
        .expect("send");
}

/// Reads events up to the first of type `kind`; returns them all.
fn ws_until(
    ws: &mut tokio_tungstenite::tungstenite::WebSocket<TcpStream>,
    kind: &str,
) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    loop {
        let msg = ws.read().expect("read");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            let done = v["type"] == kind;
            got.push(v);
            if done {
                return got;
            }
        }
    }
}

#[test]
fn a_client_that_stops_reading_loses_its_session_and_its_reply() {
    use serde_json::json;
    let server = Server::start(&[], &[("LFM2D_REALTIME_WRITE_TIMEOUT_MS", "2000")]);
    let p = server.port;
    let mut stalled = ws_connect(p);
    stalled
        .get_ref()
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    ws_send(
        &mut stalled,
        json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"turn_detection": null}}, "max_output_tokens": 4096}}),
    );
    ws_send(
        &mut stalled,
        json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Tell me a long story."}]}}),
    );
    ws_send(&mut stalled, json!({"type": "response.create"}));
    // Events the server answers at length (an error naming the unknown type), never read.
    let big = "x".repeat(60_000);
    for _ in 0..400 {
        let ev = json!({"type": big}).to_string();
        if stalled
            .send(tokio_tungstenite::tungstenite::Message::text(ev))
            .is_err()
        {
            break;
        }
    }
    let closed = server.wait_log("write timeout", Duration::from_secs(30));
    assert!(closed.is_some(), "the stalled session was not closed");
    // Another client is served: a reply from start to end.
    let (status, took) = timed_upgrade(p, &[]);
    assert!(
        status.contains("101") && took < Duration::from_secs(1),
        "{status} {took:?}"
    );
    let mut ws = ws_connect(p);
    ws_until(&mut ws, "session.created");
    ws_send(
        &mut ws,
        json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"turn_detection": null}}, "max_output_tokens": 20}}),
    );
    ws_send(
        &mut ws,
        json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello?"}]}}),
    );
    ws_send(&mut ws, json!({"type": "response.create"}));
    let events = ws_until(&mut ws, "response.done");
    let done = events.last().unwrap();
    assert_ne!(done["response"]["status"], "failed", "{done}");
    drop(stalled);
}

#[test]
fn a_frame_over_the_limit_is_closed_with_1009_and_a_15_mib_append_is_taken() {
    use serde_json::json;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;
    let server = Server::start(&[], &[]);
    let p = server.port;
    let mut ws = ws_connect(p);
    ws_until(&mut ws, "session.created");
    ws_send(
        &mut ws,
        json!({"type": "session.update", "session": {"type": "realtime",
            "audio": {"input": {"turn_detection": null}}}}),
    );
    ws_until(&mut ws, "session.updated");
    // 15 MiB of pcm16 (327 s at 24 kHz) in one append, then a retrieve to see that no error
    // came before its answer.
    let audio = vec![0u8; 15 << 20];
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&audio);
    ws_send(
        &mut ws,
        json!({"type": "input_audio_buffer.append", "audio": b64}),
    );
    ws_send(&mut ws, json!({"type": "input_audio_buffer.commit"}));
    let events = ws_until(&mut ws, "error");
    let err = events.last().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    // The commit is what is refused: the audio cannot fit the model's context.
    assert_eq!(err["error"]["code"], "context_length_exceeded", "{err}");
    ws_send(&mut ws, json!({"type": "input_audio_buffer.clear"}));
    ws_until(&mut ws, "input_audio_buffer.cleared");
    // 8 MB of instructions: refused at once, without the memory to tokenize them.
    let long = "word ".repeat(1_600_000);
    ws_send(
        &mut ws,
        json!({"type": "session.update", "session": {"type": "realtime", "instructions": long}}),
    );
    let err = ws_until(&mut ws, "error").pop().unwrap();
    assert_eq!(err["error"]["code"], "context_length_exceeded", "{err}");
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap_or_default();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    assert!(
        peak_kb < 600 << 10,
        "the server's peak memory reached {peak_kb} kB"
    );
    // Over the hard limit: a close frame with 1009.
    let huge = "x".repeat(22 << 20);
    let _ = ws.send(Message::text(huge));
    let code = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame.map(|f| f.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, Some(CloseCode::Size));
}

/// A session that floods the engine (many audio items, then a reply) does not make another
/// session's reply wait behind its backlog: the sessions' jobs are taken in turn.
#[test]
fn a_flooding_session_does_not_starve_another() {
    use serde_json::json;
    let server = Server::start(&[], &[]);
    let p = server.port;
    let manual = json!({"type": "session.update", "session": {"type": "realtime",
        "output_modalities": ["text"], "audio": {"input": {"turn_detection": null}},
        "max_output_tokens": 20}});
    let mut a = ws_connect(p);
    ws_until(&mut a, "session.created");
    ws_send(&mut a, manual.clone());
    ws_until(&mut a, "session.updated");
    let mut b = ws_connect(p);
    ws_until(&mut b, "session.created");
    ws_send(&mut b, manual);
    ws_until(&mut b, "session.updated");
    // 30 items of 10 s of audio each (a tone), then a reply.
    let tone: Vec<u8> = (0..240_000)
        .flat_map(|i| {
            let v = ((i as f32 * 0.05).sin() * 8000.0) as i16;
            v.to_le_bytes()
        })
        .collect();
    use base64::Engine;
    let audio = base64::engine::general_purpose::STANDARD.encode(&tone);
    for _ in 0..30 {
        ws_send(
            &mut a,
            json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                "content": [{"type": "input_audio", "audio": audio}]}}),
        );
    }
    ws_send(&mut a, json!({"type": "response.create"}));
    // The session has passed them all to the engine once it announced the reply.
    let t0 = Instant::now();
    ws_until(&mut a, "response.created");
    eprintln!("A's items and reply queued in {:?}", t0.elapsed());
    let reader = std::thread::spawn(move || {
        // When A's reply begins to come.
        loop {
            let ev = ws_until(&mut a, "response.output_text.delta");
            if let Some(last) = ev.last() {
                if last["type"] == "response.output_text.delta" {
                    return Instant::now();
                }
            }
        }
    });
    ws_send(
        &mut b,
        json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello?"}]}}),
    );
    ws_send(&mut b, json!({"type": "response.create"}));
    ws_until(&mut b, "response.done");
    let b_done = Instant::now();
    let a_began = reader.join().unwrap();
    eprintln!(
        "B's reply done {:?} after the start; A's reply began {:?} after it",
        b_done - t0,
        a_began - t0
    );
    assert!(
        b_done < a_began,
        "B's reply waited for A's backlog (B done {:?} after A's reply began)",
        b_done - a_began
    );
}
