//! Token ids of the real LFM2 tokenizer (audio names at ids 128-132) against Python `tokenizers`,
//! recorded by `tools/reference/make_fixtures.py` in `tests/fixtures/tokenizer/cases.json`.

mod common;

use lfm2_audio::tokenizer::TextTokenizer;

fn check(tokenizer: &std::path::Path, cases: &str) {
    let tok = TextTokenizer::from_file(tokenizer).expect("tokenizer loads");
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("tokenizer").join(cases)).unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 20, "too few cases");
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "encoding {text:?}");
        assert_eq!(
            tok.decode(&want).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decoding {text:?}"
        );
    }
}

#[test]
fn real_tokenizer_matches_python() {
    check(&common::real_tokenizer(), "cases.json");
}

#[test]
fn fixture_tokenizer_matches_python() {
    check(
        &common::fixtures().join("tokenizer/fixture-tokenizer.json"),
        "fixture-cases.json",
    );
}

#[test]
fn special_tokens_have_the_reference_ids() {
    let tok = TextTokenizer::from_file(&common::real_tokenizer()).unwrap();
    let s = tok.special();
    assert_eq!(
        (
            s.start_of_text,
            s.im_start,
            s.im_end,
            s.audio_start,
            s.text_end
        ),
        (1, 6, 7, 128, 130)
    );
}

#[test]
fn a_tokenizer_without_audio_names_is_rejected() {
    // The plain LFM2 tokenizer calls id 128 `<|reserved_118|>`: not an LFM2-Audio tokenizer.
    let text = std::fs::read_to_string(common::real_tokenizer())
        .unwrap()
        .replace("<|audio_start|>", "<|reserved_118|>");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, text).unwrap();
    let err = TextTokenizer::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("has no token <|audio_start|>"), "{err}");
}
