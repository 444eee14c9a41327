//! Hostile input on the command line: damaged audio files, absurd configurations and flags. Each
//! gives a one-line error and exit status 1 (or a documented, bounded behaviour), never a panic,
//! an abort or a runaway allocation. The damaged files are made here.

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::fixtures;

/// What a run of the binary did, with its peak resident memory.
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    peak_mb: f64,
}

impl Run {
    /// Exit status 1 with one line on stderr naming `what`; no panic.
    fn assert_refused(&self, what: &str) {
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(
            (self.code, self.signal),
            (Some(1), None),
            "{}\n{}",
            self.stdout,
            self.stderr
        );
        assert_eq!(lines.len(), 1, "one line on stderr:\n{}", self.stderr);
        assert!(lines[0].starts_with("error: "), "{}", self.stderr);
        assert!(
            lines[0].contains(what),
            "expected {what:?} in {:?}",
            lines[0]
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }
}

impl Run {
    /// Exit status 1, the last line on stderr an error naming `what`; no panic.
    fn assert_fails_with(&self, what: &str) {
        assert_eq!((self.code, self.signal), (Some(1), None), "{}", self.stderr);
        let last = self.stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(what),
            "{}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }
}

/// Runs `lfm2d args` and measures its peak memory (the child's maximum resident set).
// The child is reaped by `wait4`, which also gives its resource usage.
#[allow(clippy::zombie_processes)]
fn run(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lfm2d"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lfm2d runs");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for this child only.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let status = std::process::ExitStatus::from_raw(status);
    Run {
        code: status.code(),
        signal: status.signal(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        peak_mb: usage.ru_maxrss as f64 / 1024.0,
    }
}

/// `lfm2d chat` on the tiny-c model with `input` as the question.
fn chat(input: &str) -> Run {
    let out = std::env::temp_dir().join(format!("lfm2d-hostile-reply-{}.wav", std::process::id()));
    run(&[
        "chat",
        "--model",
        &model("tiny-c"),
        "--input",
        input,
        "--out",
        out.to_str().unwrap(),
    ])
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lfm2d-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn model(name: &str) -> String {
    fixtures()
        .join(name)
        .join("model")
        .to_str()
        .unwrap()
        .to_owned()
}

/// A 16-bit PCM WAV whose header says `rate` Hz, with `samples` samples of a tone.
fn wav(path: &Path, rate: u32, channels: u16, samples: usize) {
    let mut data = Vec::with_capacity(samples * 2 * channels as usize);
    for i in 0..samples {
        let v = ((i as f32 * 0.07).sin() * 8000.0) as i16;
        for _ in 0..channels {
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    let block = 2 * channels;
    let mut fmt = Vec::new();
    fmt.extend_from_slice(&1u16.to_le_bytes());
    fmt.extend_from_slice(&channels.to_le_bytes());
    fmt.extend_from_slice(&rate.to_le_bytes());
    fmt.extend_from_slice(&rate.wrapping_mul(block as u32).to_le_bytes());
    fmt.extend_from_slice(&block.to_le_bytes());
    fmt.extend_from_slice(&16u16.to_le_bytes());
    std::fs::write(path, riff(&fmt, &data)).unwrap();
}

fn riff(fmt: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&((4 + 8 + fmt.len() + 8 + data.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WAVE");
    out.extend_from_slice(b"fmt ");
    out.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
    out.extend_from_slice(fmt);
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// A short IMA ADPCM WAV with `channels` channels (the decoder crate supports only 1 or 2 and
/// panics on more).
fn ima_adpcm(path: &Path, channels: u16) {
    let block_align = 36 * channels;
    let mut fmt = Vec::new();
    fmt.extend_from_slice(&0x11u16.to_le_bytes());
    fmt.extend_from_slice(&channels.to_le_bytes());
    fmt.extend_from_slice(&8000u32.to_le_bytes());
    fmt.extend_from_slice(&(4000 * channels as u32).to_le_bytes());
    fmt.extend_from_slice(&block_align.to_le_bytes());
    fmt.extend_from_slice(&4u16.to_le_bytes());
    fmt.extend_from_slice(&2u16.to_le_bytes());
    fmt.extend_from_slice(&65u16.to_le_bytes());
    let data: Vec<u8> = (0..block_align).map(|i| (i * 37) as u8).collect();
    std::fs::write(path, riff(&fmt, &data)).unwrap();
}

#[test]
fn wav_headers_with_unsupported_rates_are_refused() {
    let dir = scratch("rates");
    for rate in [0u32, 1, 999, 999_983, 4_000_000_000] {
        let path = dir.join(format!("r{rate}.wav"));
        wav(&path, rate, 1, 4000);
        let p = path.to_str().unwrap();
        let r = run(&["transcribe", "--model", &model("tiny-a"), p]);
        // transcribe reports each file, then the count.
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("sample rate {rate} Hz is not supported")),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        let r = chat(p);
        r.assert_refused(&format!("sample rate {rate} Hz is not supported"));
    }
}

#[test]
fn a_panic_inside_the_decoder_is_an_error_for_that_file() {
    let dir = scratch("adpcm");
    for channels in [3, 4, 5] {
        let path = dir.join(format!("ima{channels}.wav"));
        ima_adpcm(&path, channels);
        let r = chat(path.to_str().unwrap());
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains(path.to_str().unwrap()), "{}", r.stderr);
        // The decoder crate panics on these (`unreachable!`); the panic is this file's error.
        assert!(
            r.stderr.contains("the audio decoder failed on this file"),
            "{}",
            r.stderr
        );
    }
    // A tiny file that starts with an ID3v2 tag and holds nothing else of use.
    let id3 = dir.join("tag.mp3");
    let mut bytes = b"ID3\x04\x00\x00\x00\x00\x00\x20".to_vec();
    bytes.extend((0..40u8).map(|i| i.wrapping_mul(97)));
    std::fs::write(&id3, &bytes).unwrap();
    let r = chat(id3.to_str().unwrap());
    r.assert_refused("tag.mp3");
}

#[test]
fn odd_rates_resample_in_bounded_memory() {
    // 0.3 s at 44,101 Hz: the exact table would be 2.8 GB.
    let dir = scratch("odd");
    let path = dir.join("odd.wav");
    wav(&path, 44_101, 1, 13_230);
    let r = run(&[
        "transcribe",
        "--model",
        &model("tiny-a"),
        "--json",
        "--max-new-tokens",
        "4",
        path.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.peak_mb < 400.0, "peak {} MB", r.peak_mb);
}

#[test]
fn chat_refuses_a_long_question_in_bounded_memory() {
    // 130 s at 8 kHz: over the 120 s chat takes.
    let dir = scratch("long");
    let path = dir.join("long.wav");
    wav(&path, 8000, 1, 130 * 8000);
    let r = chat(path.to_str().unwrap());
    r.assert_refused("longer than 120 s");
    assert!(r.peak_mb < 200.0, "peak {} MB", r.peak_mb);
}

#[test]
fn a_fifo_is_refused_instead_of_read_forever() {
    let dir = scratch("fifo");
    let fifo = dir.join("fifo.wav");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let r = chat(fifo.to_str().unwrap());
    r.assert_refused("not a regular file");
}

/// A copy of the tiny-a model whose `config.json` is changed by `edit`.
fn damaged_model(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let src = fixtures().join("tiny-a/model");
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "config.json" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir.to_str().unwrap().to_owned()
}

#[test]
fn absurd_configuration_sizes_are_refused_by_key() {
    let dir = scratch("config");
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "layers",
            Box::new(|c| c["lfm"]["num_hidden_layers"] = 1_000_000_000_000u64.into()),
            "`lfm.num_hidden_layers`",
        ),
        (
            "float-layers",
            Box::new(|c| c["lfm"]["num_hidden_layers"] = serde_json::json!(1e30)),
            "`lfm.num_hidden_layers`",
        ),
        (
            "n_fft",
            Box::new(|c| c["preprocessor"]["n_fft"] = 1_000_000_000_000u64.into()),
            "`preprocessor.n_fft`",
        ),
        (
            "pad_to",
            Box::new(|c| c["preprocessor"]["pad_to"] = 1_000_000_000_000_000_000u64.into()),
            "`preprocessor.pad_to`",
        ),
        (
            "depth",
            Box::new(|c| c["depthformer"]["layers"] = 1_000_000_000u64.into()),
            "`depthformer.layers`",
        ),
        (
            "idxs",
            Box::new(|c| {
                c["lfm"].as_object_mut().unwrap().remove("layer_types");
                c["lfm"]["full_attn_idxs"] = vec![1u64; 100_000].into();
            }),
            "`lfm.full_attn_idxs`",
        ),
        (
            "huge-file",
            Box::new(|c| c["padding"] = "x".repeat(2 << 20).into()),
            "too large for a configuration",
        ),
    ];
    for (name, edit, what) in cases {
        let m = damaged_model(&dir.join(name), edit);
        let r = run(&["generate", "--model", &m, "--prompt", "Hi"]);
        r.assert_refused(what);
        assert!(r.peak_mb < 200.0, "{name}: peak {} MB", r.peak_mb);
    }
}

#[test]
fn absurd_flags_are_refused_or_clamped() {
    let m = model("tiny-a");
    let r = run(&[
        "transcribe",
        "--model",
        &m,
        "--max-segment-seconds",
        "1e12",
        "x.wav",
    ]);
    r.assert_refused("--max-segment-seconds must be between 1 and 120");
    let r = run(&["listen", "--seconds", "inf"]);
    r.assert_refused("--seconds");
    let r = run(&[
        "bench",
        "--model",
        &model("tiny-c"),
        "--runs",
        "1",
        "--agreement-steps",
        "0",
        "--history",
        "1000000000000",
    ]);
    r.assert_fails_with("--history must be at most");
    let r = run(&["bench", "--model", &m, "--utterance-seconds", "inf"]);
    r.assert_refused("--utterance-seconds");
    // More threads than cores: clamped, with a warning.
    let r = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--threads",
        "10000",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("10000 threads requested"), "{}", r.stderr);
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_with_the_numbers() {
    // 120 KB of system text: tens of thousands of tokens, over the default 4096 positions.
    let words = ["the", "assistant", "answers", "questions", "about", "time"];
    let mut system = String::new();
    let mut i = 0usize;
    while system.len() < 120_000 {
        system.push_str(words[i % words.len()]);
        system.push(' ');
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    let r = run(&[
        "generate",
        "--model",
        &model("tiny-a"),
        "--system",
        &system,
        "--prompt",
        "Hi",
    ]);
    r.assert_refused("more than fit in the context of 4096 positions");
}
