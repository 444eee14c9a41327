//! Helpers shared by the command-line tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
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

/// The `[[tools]]` entry of a `get_weather` tool whose command writes the JSON arguments it gets
/// to `seen` (the side effect the tests check) and answers a sunny forecast.
pub fn weather_tool(seen: &Path) -> String {
    format!(
        r#"[[tools]]
name = "get_weather"
description = "Get the weather forecast for a city."
parameters = {{ type = "object", properties = {{ city = {{ type = "string" }} }}, required = ["city"] }}
command = ["sh", "-c", "cat > '{}'; echo '{{\"forecast\": \"sunny\"}}'"]
timeout_secs = 5
"#,
        seen.display()
    )
}
