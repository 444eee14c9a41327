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
        let model = root().join("tests/fixtures/tiny-c/model");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lfm2d"));
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

#[test]
fn the_official_openai_client_talks_to_lfm2d() {
    let python = root().join(".venv-rt/bin/python");
    if !python.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: tools/setup.sh makes it (the openai package for this test)",
            python.display()
        );
        eprintln!(
            "\n*** SKIPPED the_official_openai_client_talks_to_lfm2d: no {} (run tools/setup.sh)\n",
            python.display()
        );
        return;
    }
    let server = Server::start(&[], &[("LFM2D_FORCE_REPLY", FORCED_TOOL_CALL)]);
    let mut client = Command::new(&python)
        .arg(root().join("tests/realtime/client_test.py"))
        .arg(server.port.to_string())
        .arg(root().join("tests/fixtures/audio/what_time_16k.wav"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    let deadline = Instant::now() + Duration::from_secs(90);
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
    let status = status.expect("the client test finished within 90 s");
    assert!(status.success(), "the client test failed: {err}");
    assert!(out.contains("all parts passed"), "{out}");
}
