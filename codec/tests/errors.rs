//! Bad input and damaged or missing files give one-line errors, never a panic.

mod common;

use std::path::Path;

use codec::{open_detokenizer, DetokenizerChoice};
use common::*;
use lfm2_audio::format::Frame;

const MIMI: &str = "tokenizer-e351c8d8-checkpoint125.safetensors";

/// A copy of the tiny-c decoders (no backbone) that a test may damage.
fn decoders_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = tiny_c_model();
    copy_dir(
        &src.join("audio_detokenizer"),
        &tmp.path().join("audio_detokenizer"),
    );
    for f in [MIMI, "mimi_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn open_err(dir: &Path, choice: DetokenizerChoice) -> String {
    let err = match open_detokenizer(dir, choice) {
        Ok(_) => panic!("opening must fail"),
        Err(e) => e.to_string(),
    };
    println!("{err}");
    assert!(!err.contains('\n'), "error is not one line: {err}");
    err
}

/// Rewrites a safetensors file, letting `edit` drop tensors or change their shape.
fn rewrite(path: &Path, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            edit(&name, view.shape()).map(|shape| {
                let elem = view.data().len() / view.shape().iter().product::<usize>().max(1);
                let n: usize = shape.iter().product();
                let mut data = view.data().to_vec();
                data.resize(n * elem, 0);
                (name, view.dtype(), shape, data)
            })
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn auto_picks_the_lfm2_detokenizer_then_mimi() {
    let tmp = decoders_copy();
    let d = open_detokenizer(tmp.path(), DetokenizerChoice::Auto).unwrap();
    assert_eq!(d.lookahead(), 480);
    assert_eq!(d.sample_rate(), 24_000);
    std::fs::remove_dir_all(tmp.path().join("audio_detokenizer")).unwrap();
    let d = open_detokenizer(tmp.path(), DetokenizerChoice::Auto).unwrap();
    assert_eq!(d.lookahead(), 0);
    let d = open_detokenizer(&tiny_c_model(), DetokenizerChoice::Mimi).unwrap();
    assert_eq!(d.lookahead(), 0);
}

#[test]
fn end_of_audio_frames_are_rejected_and_leave_the_stream_intact() {
    let r = DecodeReference::load();
    for choice in [DetokenizerChoice::Lfm2, DetokenizerChoice::Mimi] {
        let mut d = open_detokenizer(&tiny_c_model(), choice).unwrap();
        let clean = d.decode(&r.frames[..3]).unwrap();

        let mut out = Vec::new();
        d.push_into(&r.frames[0], &mut out).unwrap();
        let err = d.push(&[2048; 8]).unwrap_err().to_string();
        println!("{choice:?}: {err}");
        assert!(
            err.contains("audio frame 1") && err.contains("end of audio"),
            "{err}"
        );
        let mut bad: Frame = r.frames[1];
        bad[5] = 2048;
        assert!(d.push(&bad).is_err());
        assert!(d.push(&[0, 0, 0, 0, 0, 0, 0, u32::MAX]).is_err());
        // The rejected frames did not enter the stream.
        d.push_into(&r.frames[1], &mut out).unwrap();
        d.push_into(&r.frames[2], &mut out).unwrap();
        d.flush_into(&mut out).unwrap();
        let (diff, _) = errors(&out, &clean);
        assert!(
            diff <= 1e-5,
            "{choice:?}: stream changed by rejected frames ({diff:e})"
        );

        let mut frames = r.frames[..4].to_vec();
        frames[2][0] = 2048;
        let err = d.decode(&frames).unwrap_err().to_string();
        assert!(err.contains("audio frame 2"), "{err}");
        assert!(d.decode(&[]).unwrap().is_empty());
    }
}

#[test]
fn a_directory_without_decoders_names_both() {
    let tmp = tempfile::tempdir().unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Auto);
    assert!(
        err.contains("audio_detokenizer") && err.contains(MIMI),
        "{err}"
    );
    let err = open_err(tmp.path(), DetokenizerChoice::Lfm2);
    assert!(err.contains("audio_detokenizer"), "{err}");
    let err = open_err(tmp.path(), DetokenizerChoice::Mimi);
    assert!(err.contains(MIMI), "{err}");
    let err = open_err(&tmp.path().join("nope"), DetokenizerChoice::Auto);
    assert!(err.contains("model directory"), "{err}");
}

#[test]
fn damaged_lfm2_detokenizer_files_are_named() {
    let tmp = decoders_copy();
    let dir = tmp.path().join("audio_detokenizer");
    let weights = dir.join("model.safetensors");
    let config = dir.join("config.json");

    let original = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &original[..original.len() / 2]).unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Lfm2);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    std::fs::write(&weights, &original).unwrap();
    rewrite(&weights, |name, shape| {
        (name != "lin.bias").then(|| shape.to_vec())
    });
    let err = open_err(tmp.path(), DetokenizerChoice::Lfm2);
    assert!(err.contains("`lin.bias` is missing"), "{err}");

    std::fs::write(&weights, &original).unwrap();
    rewrite(&weights, |name, shape| {
        Some(if name == "emb.emb.weight" {
            vec![2048, shape[1]]
        } else {
            shape.to_vec()
        })
    });
    let err = open_err(tmp.path(), DetokenizerChoice::Lfm2);
    assert!(
        err.contains("emb.emb.weight") && err.contains("shape"),
        "{err}"
    );

    std::fs::write(&weights, &original).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"output_size\": 1282", "\"output_size\": 1000"),
    )
    .unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Lfm2);
    assert!(err.contains("output_size"), "{err}");
    std::fs::write(&config, "{ not json").unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Lfm2);
    assert!(
        err.contains("config.json") && err.contains("invalid JSON"),
        "{err}"
    );
    std::fs::remove_file(&config).unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Lfm2);
    assert!(
        err.contains("config.json") && err.contains("missing"),
        "{err}"
    );
    std::fs::write(&config, &text).unwrap();
    std::fs::remove_file(&weights).unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Lfm2);
    assert!(
        err.contains("model.safetensors") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn damaged_mimi_files_are_named() {
    let tmp = decoders_copy();
    let weights = tmp.path().join(MIMI);
    let config = tmp.path().join("mimi_config.json");
    let original = std::fs::read(&weights).unwrap();

    std::fs::write(&weights, &original[..100]).unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Mimi);
    assert!(err.contains(MIMI), "{err}");

    std::fs::write(&weights, &original).unwrap();
    let gone = "decoder_transformer.transformer.layers.1.linear2.weight";
    rewrite(&weights, |name, shape| {
        (name != gone).then(|| shape.to_vec())
    });
    let err = open_err(tmp.path(), DetokenizerChoice::Mimi);
    assert!(err.contains(gone), "{err}");

    std::fs::write(&weights, &original).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"context\": 8", "\"context\": 0")).unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Mimi);
    assert!(err.contains("transformer_kwargs.context"), "{err}");
    std::fs::write(
        &config,
        text.replace("\"d_model\": 32", "\"d_model\": \"big\""),
    )
    .unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Mimi);
    assert!(err.contains("mimi_config.json"), "{err}");
    // Without its config file the small checkpoint is read as Mimi v0.1 and does not fit.
    std::fs::remove_file(&config).unwrap();
    let err = open_err(tmp.path(), DetokenizerChoice::Mimi);
    assert!(err.contains("shape"), "{err}");
}
