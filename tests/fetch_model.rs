//! `lfm2d fetch-model` against a local server that speaks the Hugging Face hub's protocol and
//! serves the fixture checkpoint tiny-c: the repository listing
//! (`/api/models/{repo}/revision/{rev}`), and files at `/{repo}/resolve/{rev}/{path}` with the
//! hub's headers (ETag, X-Linked-Etag, X-Repo-Commit, Content-Length) and byte ranges. The
//! server can cut a transfer short once or serve damaged bytes, and logs every request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use sha1::Digest;

const REPO: &str = "LiquidAI/LFM2.5-Audio-1.5B";
const COMMIT: &str = "3f1a2b9c4d5e6f708192a3b4c5d6e7f8091a2b3c";
const WEIGHTS: &str = "model.safetensors";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn git_blob_sha1(content: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", content.len()).as_bytes());
    h.update(content);
    hex(&h.finalize())
}

/// A file of the served repository. Safetensors files are stored in LFS, as on the hub.
struct RepoFile {
    content: Vec<u8>,
    sha256: String,
    lfs: bool,
}

impl RepoFile {
    fn etag(&self) -> String {
        if self.lfs {
            self.sha256.clone()
        } else {
            git_blob_sha1(&self.content)
        }
    }
}

#[derive(Default)]
struct Faults {
    /// Close the connection after this many bytes of the next full transfer of this file.
    cut_once: Option<(String, usize)>,
    /// Serve this file with one byte changed (same length and headers).
    corrupt: Option<String>,
}

#[derive(Debug, Clone)]
struct Request {
    path: String,
    range: Option<String>,
}

struct Hub {
    url: String,
    log: Arc<Mutex<Vec<Request>>>,
    faults: Arc<Mutex<Faults>>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-c/model")
}

fn fixture_files() -> BTreeMap<String, RepoFile> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, RepoFile>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
                continue;
            }
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let content = std::fs::read(&path).unwrap();
            let sha256 = hex(&sha2::Sha256::digest(&content));
            let lfs = name.ends_with(".safetensors");
            out.insert(
                name,
                RepoFile {
                    content,
                    sha256,
                    lfs,
                },
            );
        }
    }
    let mut files = BTreeMap::new();
    walk(&fixture_dir(), &fixture_dir(), &mut files);
    // A model card, which the command has no use for.
    let card = b"# LFM2.5-Audio-1.5B (fixture)\n".to_vec();
    files.insert(
        "README.md".into(),
        RepoFile {
            sha256: hex(&sha2::Sha256::digest(&card)),
            content: card,
            lfs: false,
        },
    );
    files
}

fn listing(files: &BTreeMap<String, RepoFile>) -> String {
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, f)| {
            let mut s = serde_json::json!({
                "rfilename": name,
                "size": f.content.len(),
                "blobId": git_blob_sha1(&f.content),
            });
            if f.lfs {
                // On the hub, blobId is then that of the LFS pointer; it is not checked for LFS
                // files.
                s["blobId"] = git_blob_sha1(f.sha256.as_bytes()).into();
                s["lfs"] = serde_json::json!({
                    "sha256": f.sha256,
                    "size": f.content.len(),
                    "pointerSize": 134,
                });
            }
            s
        })
        .collect();
    serde_json::json!({ "id": REPO, "modelId": REPO, "sha": COMMIT, "siblings": siblings })
        .to_string()
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn not_found(stream: &mut TcpStream) {
    let headers = [("X-Error-Code".to_owned(), "EntryNotFound".to_owned())];
    respond(stream, "404 Not Found", &headers, b"not found");
}

/// `bytes=a-b` or `bytes=a-` of a file of `len` bytes, as an inclusive range.
fn parse_range(range: &str, len: usize) -> Option<(usize, usize)> {
    let spec = range.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: usize = a.parse().ok()?;
    let end = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

fn serve_file(
    stream: &mut TcpStream,
    file: &RepoFile,
    name: &str,
    range: Option<&str>,
    faults: &Mutex<Faults>,
) {
    let mut content = file.content.clone();
    let mut cut = None;
    {
        let mut faults = faults.lock().unwrap();
        if faults.corrupt.as_deref() == Some(name) {
            let mid = content.len() / 2;
            content[mid] ^= 0x5a;
        }
        let is_probe = range == Some("bytes=0-0");
        if let Some((f, n)) = &faults.cut_once {
            if f == name && !is_probe {
                cut = Some(*n);
                faults.cut_once = None;
            }
        }
    }
    let len = content.len();
    let etag = file.etag();
    let mut headers = vec![
        ("ETag".to_owned(), format!("\"{etag}\"")),
        ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
        ("Accept-Ranges".to_owned(), "bytes".to_owned()),
    ];
    if file.lfs {
        headers.push(("X-Linked-Etag".to_owned(), format!("\"{}\"", file.sha256)));
        headers.push(("X-Linked-Size".to_owned(), len.to_string()));
    }
    let (status, body) = match range {
        None => ("200 OK", &content[..]),
        Some(r) => match parse_range(r, len) {
            Some((a, b)) => {
                headers.push(("Content-Range".to_owned(), format!("bytes {a}-{b}/{len}")));
                ("206 Partial Content", &content[a..=b])
            }
            None => {
                headers.push(("Content-Range".to_owned(), format!("bytes */{len}")));
                respond(stream, "416 Range Not Satisfiable", &headers, b"");
                return;
            }
        },
    };
    match cut {
        Some(n) if n < body.len() => {
            // Announce the whole body, send part of it, and hang up.
            let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
            for (k, v) in &headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[..n]);
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Both);
        }
        _ => respond(stream, status, &headers, body),
    }
}

fn handle(
    mut stream: TcpStream,
    files: &BTreeMap<String, RepoFile>,
    log: &Mutex<Vec<Request>>,
    faults: &Mutex<Faults>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_owned());
            }
        }
    }
    let path = target.split('?').next().unwrap_or("").to_owned();
    log.lock().unwrap().push(Request {
        path: path.clone(),
        range: range.clone(),
    });

    let revisions = ["main", COMMIT];
    if let Some(rev) = path.strip_prefix(&format!("/api/models/{REPO}/revision/")) {
        if revisions.contains(&rev) {
            let headers = [("Content-Type".to_owned(), "application/json".to_owned())];
            respond(&mut stream, "200 OK", &headers, listing(files).as_bytes());
        } else {
            not_found(&mut stream);
        }
        return;
    }
    if let Some(rest) = path.strip_prefix(&format!("/{REPO}/resolve/")) {
        if let Some((rev, name)) = rest.split_once('/') {
            if let (true, Some(file)) = (revisions.contains(&rev), files.get(name)) {
                serve_file(&mut stream, file, name, range.as_deref(), faults);
                return;
            }
        }
    }
    not_found(&mut stream);
}

fn start_hub() -> Hub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let files = Arc::new(fixture_files());
    let log = Arc::new(Mutex::new(Vec::new()));
    let faults = Arc::new(Mutex::new(Faults::default()));
    let (l, f) = (log.clone(), faults.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (files, log, faults) = (files.clone(), l.clone(), f.clone());
            std::thread::spawn(move || handle(stream, &files, &log, &faults));
        }
    });
    Hub { url, log, faults }
}

impl Hub {
    fn take_log(&self) -> Vec<Request> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// `lfm2d ARGS` with this server as the hub and `hf_home` as HF_HOME.
    fn lfm2d(&self, hf_home: &Path, args: &[&str]) -> Command {
        let mut cmd = lfm2d(hf_home, args);
        cmd.env("HF_ENDPOINT", &self.url);
        cmd
    }
}

fn lfm2d(hf_home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lfm2d"));
    cmd.args(args).env("HF_HOME", hf_home);
    for var in [
        "HF_ENDPOINT",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN",
        "XDG_CACHE_HOME",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn snapshot(cache: &Path) -> PathBuf {
    cache
        .join("models--LiquidAI--LFM2.5-Audio-1.5B")
        .join("snapshots")
        .join(COMMIT)
}

/// Every fixture file is in the snapshot, byte for byte, as a link into `blobs/`; the model card
/// is not.
fn assert_fetched(cache: &Path) {
    let snap = snapshot(cache);
    let blobs = cache
        .join("models--LiquidAI--LFM2.5-Audio-1.5B")
        .join("blobs");
    for (name, file) in fixture_files() {
        let path = snap.join(&name);
        if name == "README.md" {
            assert!(!path.exists(), "the model card was downloaded");
            continue;
        }
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == file.content, "{name} differs from the served file");
        let link = std::fs::symlink_metadata(&path).unwrap();
        assert!(link.file_type().is_symlink(), "{name} is not a link");
        let target = std::fs::canonicalize(&path).unwrap();
        assert_eq!(
            target,
            std::fs::canonicalize(blobs.join(file.etag())).unwrap(),
            "{name}"
        );
    }
    let main = cache
        .join("models--LiquidAI--LFM2.5-Audio-1.5B")
        .join("refs")
        .join("main");
    assert_eq!(std::fs::read_to_string(main).unwrap().trim(), COMMIT);
}

fn downloads(log: &[Request]) -> Vec<&Request> {
    log.iter()
        .filter(|r| r.path.contains("/resolve/") && r.range.as_deref() != Some("bytes=0-0"))
        .collect()
}

#[test]
fn fetches_into_the_hub_cache_and_the_commands_find_it() {
    let hub = start_hub();
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");

    let (out, stderr) = run(&mut hub.lfm2d(home.path(), &["fetch-model"]));
    assert!(out.status.success(), "{stderr}");
    assert_fetched(&cache);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), snapshot(&cache).to_str().unwrap());
    assert!(
        stderr.contains("model.safetensors: 4.25 MiB, sha256 verified"),
        "{stderr}"
    );
    assert!(
        stderr.contains("config.json: 2.05 KiB, git sha1 verified"),
        "{stderr}"
    );
    let first = hub.take_log();
    let files = fixture_files().len() - 1;
    assert_eq!(downloads(&first).len(), files, "{first:?}");
    assert!(!first.iter().any(|r| r.path.ends_with("README.md")));

    // Again: everything is there, nothing is downloaded.
    let (out, stderr) = run(&mut hub.lfm2d(home.path(), &["fetch-model"]));
    assert!(out.status.success(), "{stderr}");
    let second = hub.take_log();
    assert!(downloads(&second).is_empty(), "{second:?}");
    assert!(
        stderr.contains(&format!("0 of {files} files downloaded")),
        "{stderr}"
    );
    assert_fetched(&cache);

    // The commands find the fetched model without --model (and without the server).
    let (out, stderr) = run(&mut lfm2d(
        home.path(),
        &[
            "generate",
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    ));
    assert!(out.status.success(), "{stderr}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["text_ids"].as_array().unwrap().len(), 4, "{reply}");
    // ... and give the same answer as with --model pointing at the fixture.
    let fixture = fixture_dir();
    let (direct, _) = run(&mut lfm2d(
        home.path(),
        &[
            "generate",
            "--model",
            fixture.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    ));
    assert_eq!(out.stdout, direct.stdout);
}

#[test]
fn a_broken_transfer_resumes_with_a_range_request() {
    let hub = start_hub();
    let home = tempfile::tempdir().unwrap();
    // HF_HUB_CACHE chooses the cache over HF_HOME, as for the hub's own tools.
    let cache = tempfile::tempdir().unwrap();
    let cut = 1_000_000;
    hub.faults.lock().unwrap().cut_once = Some((WEIGHTS.into(), cut));

    let (out, stderr) = run(hub
        .lfm2d(home.path(), &["fetch-model"])
        .env("HF_HUB_CACHE", cache.path()));
    assert!(out.status.success(), "{stderr}");
    assert_fetched(cache.path());
    assert!(!home.path().join("hub").exists());
    let log = hub.take_log();
    let weights: Vec<_> = downloads(&log)
        .into_iter()
        .filter(|r| r.path.ends_with(&format!("/resolve/main/{WEIGHTS}")))
        .collect();
    assert_eq!(weights.len(), 2, "{log:?}");
    assert_eq!(weights[1].range.as_deref(), Some(&*format!("bytes={cut}-")));
}

#[test]
fn a_run_that_stops_midway_is_resumed_by_the_next() {
    let hub = start_hub();
    let home = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let cut = 1_500_000;
    hub.faults.lock().unwrap().cut_once = Some((WEIGHTS.into(), cut));
    let cache_arg = cache.path().to_str().unwrap();
    let args = ["fetch-model", "--cache-dir", cache_arg, "--retries", "0"];

    let (out, stderr) = run(&mut hub.lfm2d(home.path(), &args));
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("downloading {WEIGHTS}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("run the command again to resume"),
        "{stderr}"
    );
    let sha = &fixture_files()[WEIGHTS].sha256;
    let part = cache
        .path()
        .join("models--LiquidAI--LFM2.5-Audio-1.5B/blobs")
        .join(format!("{sha}.part"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut as u64);
    hub.take_log();

    let (out, stderr) = run(&mut hub.lfm2d(home.path(), &args));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("model.safetensors: resuming at"),
        "{stderr}"
    );
    assert_fetched(cache.path());
    assert!(!part.exists());
    let log = hub.take_log();
    let weights: Vec<_> = downloads(&log)
        .into_iter()
        .filter(|r| r.path.ends_with(&format!("/resolve/main/{WEIGHTS}")))
        .collect();
    assert_eq!(weights.len(), 1, "{log:?}");
    assert_eq!(weights[0].range.as_deref(), Some(&*format!("bytes={cut}-")));
}

#[test]
fn a_damaged_file_is_named_deleted_and_fetched_again() {
    let hub = start_hub();
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    let damaged = "audio_detokenizer/model.safetensors";
    hub.faults.lock().unwrap().corrupt = Some(damaged.into());

    let (out, stderr) = run(&mut hub.lfm2d(home.path(), &["fetch-model"]));
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("checksum mismatch for {damaged}")),
        "{stderr}"
    );
    let sha = &fixture_files()[damaged].sha256;
    assert!(stderr.contains(sha.as_str()), "{stderr}");
    let blob = cache
        .join("models--LiquidAI--LFM2.5-Audio-1.5B/blobs")
        .join(sha);
    assert!(!blob.exists(), "the damaged file was kept");
    assert!(std::fs::symlink_metadata(snapshot(&cache).join(damaged)).is_err());
    // Without a complete model, the commands say so instead of loading a partial one.
    let (out, stderr) = run(&mut lfm2d(home.path(), &["generate", "--prompt", "Hi"]));
    assert!(!out.status.success());
    assert!(
        stderr.contains("incomplete") || stderr.contains("lfm2d fetch-model"),
        "{stderr}"
    );

    hub.faults.lock().unwrap().corrupt = None;
    let (out, stderr) = run(&mut hub.lfm2d(home.path(), &["fetch-model"]));
    assert!(out.status.success(), "{stderr}");
    assert_fetched(&cache);
}

#[test]
fn without_a_model_the_commands_say_how_to_get_one() {
    let home = tempfile::tempdir().unwrap();
    for args in [
        &["generate", "--prompt", "Hi"][..],
        &["bench", "--runs", "1"][..],
    ] {
        let (out, stderr) = run(&mut lfm2d(home.path(), args));
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains("lfm2d fetch-model"), "{args:?}: {stderr}");
        assert!(stderr.contains("--model DIR"), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[test]
fn an_unknown_repository_is_a_clear_error() {
    let hub = start_hub();
    let home = tempfile::tempdir().unwrap();
    let (out, stderr) = run(&mut hub.lfm2d(
        home.path(),
        &["fetch-model", "--repo", "LiquidAI/No-Such-Model"],
    ));
    assert!(!out.status.success());
    assert!(
        stderr.contains("LiquidAI/No-Such-Model at revision main was not found"),
        "{stderr}"
    );
}
