//! Helpers shared by the command-line tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs the `lfm2d` binary with `args` and returns what it did.
pub fn lfm2d(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lfm2d"))
        .args(args)
        .output()
        .expect("lfm2d runs")
}
