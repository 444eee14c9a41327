//! `lfm2d serve --wyoming`: the Wyoming server for Home Assistant, driven by the official
//! `wyoming` Python package (tests/wyoming/client_test.py) against the tiny-c fixture model the
//! way Home Assistant's integration drives it, plus raw-socket checks from Rust.
//!
//! The Python client lives in `.venv-wyoming/` (made by `tools/setup.sh`). Without it the client
//! test is skipped loudly, except in CI (`CI` set), where it fails.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::fixtures;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The seam that makes the first reply of a conversation with tools this tool call.
const FORCED_TOOL_CALL: &str = r#"<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>"#;

/// A configuration whose `get_weather` tool writes the arguments it gets to `seen` (the side
/// effect the test checks).
fn tool_config(dir: &std::path::Path, seen: &std::path::Path) -> PathBuf {
    let config = dir.join("tools.toml");
    std::fs::write(&config, common::weather_tool(seen)).expect("the configuration is written");
    config
}

/// A running `lfm2d serve --wyoming tcp://127.0.0.1:0`, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    realtime_port: Option<u16>,
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

fn port_after(line: &str, marker: &str) -> Option<u16> {
    let rest = line.split(marker).nth(1)?;
    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
    port.parse().ok()
}

impl Server {
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let model = fixtures().join("tiny-c/model");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lfm2d"));
        cmd.args(["serve", "--wyoming", "tcp://127.0.0.1:0", "--no-zeroconf"])
            .arg("--model")
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
        let want_realtime = extra.contains(&"--listen");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut port = None;
        let mut realtime_port = None;
        let mut lines = Vec::new();
        while port.is_none() || (want_realtime && realtime_port.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match log.recv_timeout(left) {
                Ok(line) => {
                    port = port.or(port_after(&line, "Wyoming server on tcp://127.0.0.1:"));
                    realtime_port =
                        realtime_port.or(port_after(&line, "listening on ws://127.0.0.1:"));
                    lines.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("the server did not start listening within 60 s: {lines:?}");
                }
            }
        }
        Self {
            child,
            port: port.unwrap_or_default(),
            realtime_port,
            log,
            lines,
        }
    }

    /// Everything the server logged so far.
    fn logged(&mut self) -> String {
        while let Ok(line) = self.log.try_recv() {
            self.lines.push(line);
        }
        self.lines.join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends raw bytes and reads the header line of the first event back.
fn exchange(port: u16, bytes: &[u8]) -> serde_json::Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    read_event(&mut BufReader::new(s))
}

/// One event: the header merged with its data.
fn read_event(r: &mut BufReader<TcpStream>) -> serde_json::Value {
    let mut line = String::new();
    r.read_line(&mut line).expect("a header line");
    let mut header: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    let n = header["data_length"].as_u64().unwrap_or(0) as usize;
    let mut data = vec![0; n];
    r.read_exact(&mut data).unwrap();
    if n > 0 {
        header["data"] = serde_json::from_slice(&data).unwrap();
    }
    let p = header["payload_length"].as_u64().unwrap_or(0) as usize;
    let mut payload = vec![0; p];
    r.read_exact(&mut payload).unwrap();
    header
}

/// What `lfm2d transcribe` makes of a clip: the transcript the server must give too.
fn cli_transcript(clip: &str) -> String {
    let out = common::lfm2d(&[
        "transcribe",
        "--model",
        fixtures().join("tiny-c/model").to_str().unwrap(),
        "--json",
        fixtures().join("audio").join(clip).to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    // The server strips the special-token markers the CLI keeps.
    let mut text = String::new();
    let mut rest = line["text"].as_str().unwrap();
    while let Some(start) = rest.find("<|") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .find("|>")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    text.push_str(rest);
    text.trim().to_owned()
}

#[test]
fn bad_input_gets_errors_and_the_connection_goes_on() {
    let server = Server::start(&[], &[]);
    let p = server.port;
    let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"{not json\n{\"type\": \"describe\"}\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let e = read_event(&mut r);
    assert_eq!(e["type"], "error");
    assert_eq!(e["data"]["code"], "invalid_header");
    let info = read_event(&mut r);
    assert_eq!(info["type"], "info");
    assert_eq!(
        info["data"]["tts"][0]["voices"].as_array().unwrap().len(),
        4
    );
    let e = exchange(
        p,
        b"{\"type\": \"audio-chunk\", \"payload_length\": 999999999}\n",
    );
    assert_eq!(e["data"]["code"], "payload_too_large", "{e}");
    let e = exchange(p, b"{\"type\": \"launch-rocket\"}\n");
    assert_eq!(e["data"]["code"], "unknown_event", "{e}");
    // A client that opened an event and stalls does not hold up the next one.
    let mut stalled = TcpStream::connect(("127.0.0.1", p)).unwrap();
    stalled
        .write_all(b"{\"type\": \"synthesize\", \"data_length\": 40}\n{")
        .unwrap();
    let info = exchange(p, b"{\"type\": \"describe\"}\n");
    assert_eq!(info["type"], "info");
}

#[test]
fn one_engine_serves_wyoming_and_the_realtime_api() {
    let server = Server::start(&["--listen", "127.0.0.1:0"], &[]);
    let info = exchange(server.port, b"{\"type\": \"describe\"}\n");
    assert_eq!(info["data"]["asr"][0]["models"][0]["name"], "model");
    let rt = server.realtime_port.expect("a Realtime port");
    let mut s = TcpStream::connect(("127.0.0.1", rt)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{rt}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    let status = String::from_utf8_lossy(&buf[..n]);
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
}

#[test]
fn a_public_address_is_allowed_with_a_warning() {
    // The warning comes before the model is loaded (here it fails to load: nothing listens).
    let out = Command::new(env!("CARGO_BIN_EXE_lfm2d"))
        .args(["serve", "--wyoming", "tcp://0.0.0.0:10399", "--no-zeroconf"])
        .args(["--model", "/nonexistent"])
        .output()
        .expect("lfm2d runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no authentication"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_lfm2d"))
        .args(["serve", "--wyoming", "udp://127.0.0.1:1"])
        .output()
        .expect("lfm2d runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("udp:// is not supported"), "{err}");
}

#[test]
fn the_official_wyoming_client_talks_to_lfm2d() {
    let python = root().join(".venv-wyoming/bin/python");
    if !python.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: tools/setup.sh makes it (the wyoming package for this test)",
            python.display()
        );
        eprintln!(
            "\n*** SKIPPED the_official_wyoming_client_talks_to_lfm2d: no {} (run tools/setup.sh)\n",
            python.display()
        );
        return;
    }
    let mut expected = serde_json::Map::new();
    for clip in ["what_time_16k.wav", "hi_44k1.wav", "hi_stereo_24k.wav"] {
        let path = fixtures().join("audio").join(clip);
        expected.insert(
            path.display().to_string(),
            serde_json::Value::String(cli_transcript(clip)),
        );
    }
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let seen = tmp.path().join("args.json");
    let config = tool_config(tmp.path(), &seen);
    let mut server = Server::start(
        &["--config", config.to_str().expect("a UTF-8 path")],
        &[("LFM2D_FORCE_REPLY", FORCED_TOOL_CALL)],
    );
    let mut client = Command::new(&python)
        .arg(root().join("tests/wyoming/client_test.py"))
        .arg(server.port.to_string())
        .arg(serde_json::Value::Object(expected).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    let deadline = Instant::now() + Duration::from_secs(240);
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
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = client.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = client.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    eprintln!("client stdout:\n{out}\nclient stderr:\n{err}");
    let status = status.expect("the client test finished within 240 s");
    assert!(status.success(), "the client test failed: {err}");
    assert!(out.contains("all parts passed"), "{out}");
    let log = server.logged();
    // The engine ran the forced call's command with its arguments, and the second turn went on
    // in the same conversation.
    let args = std::fs::read_to_string(&seen).unwrap_or_default();
    assert_eq!(args.trim(), r#"{"city":"Paris"}"#, "{log}");
    assert!(log.contains("tool get_weather: ok"), "{log}");
    assert!(
        log.contains("conversation \"01HTEST-CONVERSATION\": tool round 1"),
        "{log}"
    );
    assert!(
        log.contains("conversation \"01HTEST-CONVERSATION\": turn 2"),
        "{log}"
    );
}
