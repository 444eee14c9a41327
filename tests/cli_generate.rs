//! `lfm2d generate` as a user runs it, on the fixture models.

mod common;

use common::{fixtures, lfm2d};
use std::process::Command;

fn reference(model: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(model).join("reference.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn json_output_is_the_reference_greedy_continuation() {
    for model in ["tiny-a", "tiny-b"] {
        let r = reference(model);
        let dir = fixtures().join(model).join("model");
        let out = lfm2d(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--system",
            r["prompt"]["system"].as_str().unwrap(),
            "--prompt",
            r["prompt"]["user"].as_str().unwrap(),
            "--max-new-tokens",
            "30",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        let want = &r["greedy"]["text_ids"];
        // Generation stops early at <|im_end|> (id 7); the reference ran 30 steps without stopping.
        let want: Vec<u64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .take_while(|&id| id != 7)
            .collect();
        let got_ids: Vec<u64> = got["text_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(got_ids, want, "{model}");
        assert!(got["text"].is_string());
    }
}

#[test]
fn streamed_text_equals_the_json_text() {
    let r = reference("tiny-b");
    let dir = fixtures().join("tiny-b/model");
    let args = |json: bool| {
        let mut a = vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            r["prompt"]["user"].as_str().unwrap(),
        ];
        a.extend(["--max-new-tokens", "20"]);
        if json {
            a.push("--json");
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let streamed = Command::new(env!("CARGO_BIN_EXE_lfm2d"))
        .args(args(false))
        .output()
        .unwrap();
    let json = Command::new(env!("CARGO_BIN_EXE_lfm2d"))
        .args(args(true))
        .output()
        .unwrap();
    assert!(streamed.status.success() && json.status.success());
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let streamed = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(
        streamed.trim_end_matches('\n'),
        json["text"].as_str().unwrap()
    );
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let dir = fixtures().join("tiny-a/model");
    let run = |seed: &str| {
        let out = lfm2d(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Hello there",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--max-new-tokens",
            "25",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["text_ids"].clone()
    };
    assert_eq!(run("11"), run("11"));
    assert_ne!(run("11"), run("12"));
}

#[test]
fn user_errors_are_one_clear_line() {
    let out = lfm2d(&["generate", "--model", "/no/such/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: ") && err.contains("/no/such/model") && err.contains("missing"),
        "{err}"
    );

    let dir = fixtures().join("tiny-a/model");
    let out = lfm2d(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--temperature=-1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("--temperature"));
}
