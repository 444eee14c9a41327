//! A damaged checkpoint gives a one-line error that names the problem, never a panic.

mod common;

use std::path::{Path, PathBuf};

use lfm2_audio::model::Lfm2AudioModel;
use safetensors::tensor::TensorView;

/// A copy of the tiny-a fixture model that a test may damage.
fn model_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(common::fixtures().join("tiny-a/model")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

/// A tensor as stored: dtype, shape, bytes.
type Stored = (safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrites `model.safetensors`, letting `edit` replace or drop each tensor.
fn rewrite_weights(dir: &Path, edit: impl Fn(&str, TensorView<'_>) -> Option<Stored>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Stored)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| edit(&name, view).map(|t| (name, t)))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn keep(view: TensorView<'_>) -> Option<Stored> {
    Some((view.dtype(), view.shape().to_vec(), view.data().to_vec()))
}

fn load_error(dir: &Path) -> String {
    let err = Lfm2AudioModel::load(dir)
        .expect_err("loading must fail")
        .to_string();
    assert!(!err.contains('\n'), "error is not one line: {err}");
    println!("{err}");
    err
}

#[test]
fn the_intact_copy_loads() {
    let (_tmp, dir) = model_copy();
    Lfm2AudioModel::load(&dir).unwrap();
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let (_tmp, dir) = model_copy();
    let victim = "lfm.layers.1.self_attn.k_proj.weight";
    rewrite_weights(&dir, |name, view| {
        if name == victim {
            // Drop the last row: [32, 64] -> [31, 64].
            let (rows, cols) = (view.shape()[0], view.shape()[1]);
            let row_bytes = view.data().len() / rows;
            Some((
                view.dtype(),
                vec![rows - 1, cols],
                view.data()[..row_bytes * (rows - 1)].to_vec(),
            ))
        } else {
            keep(view)
        }
    });
    let err = load_error(&dir);
    assert!(
        err.contains(victim) && err.contains("[31, 64]") && err.contains("expected [32, 64]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = model_copy();
    let victim = "lfm.layers.3.conv.in_proj.weight";
    rewrite_weights(
        &dir,
        |name, view| if name == victim { None } else { keep(view) },
    );
    let err = load_error(&dir);
    assert!(err.contains(victim) && err.contains("missing"), "{err}");
}

#[test]
fn unsupported_dtype_is_named() {
    let (_tmp, dir) = model_copy();
    let victim = "lfm.embedding_norm.weight";
    rewrite_weights(&dir, |name, view| {
        if name == victim {
            // Same bytes reinterpreted as i32: a dtype no model weight has.
            Some((
                safetensors::Dtype::I32,
                view.shape().to_vec(),
                view.data().to_vec(),
            ))
        } else {
            keep(view)
        }
    });
    let err = load_error(&dir);
    assert!(err.contains(victim) && err.contains("I32"), "{err}");
}

#[test]
fn truncated_weights_are_reported_as_truncated() {
    let (_tmp, dir) = model_copy();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 1, 100, 5] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_error(&dir);
        assert!(
            err.contains("model.safetensors") && err.contains("not a readable safetensors file"),
            "{err}"
        );
        if cut > 1000 {
            assert!(err.contains("truncated"), "{err}");
        }
    }
}

#[test]
fn garbage_weights_are_reported() {
    let (_tmp, dir) = model_copy();
    std::fs::write(
        dir.join("model.safetensors"),
        b"RIFF\x24\x00\x00\x00WAVEfmt this is not a model at all",
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(err.contains("not a readable safetensors file"), "{err}");
}

#[test]
fn bad_config_values_name_the_key() {
    let cases: [(&str, serde_json::Value, &str); 5] = [
        (
            "/lfm/num_attention_heads",
            serde_json::json!(5),
            "`lfm.num_attention_heads`",
        ),
        (
            "/lfm/hidden_size",
            serde_json::json!("wide"),
            "`lfm.hidden_size`",
        ),
        (
            "/lfm/full_attn_idxs",
            serde_json::json!([1, 40]),
            "`lfm.full_attn_idxs[1]`",
        ),
        (
            "/depthformer/dim",
            serde_json::json!(-3),
            "`depthformer.dim`",
        ),
        (
            "/interleaved_n_text",
            serde_json::json!(0),
            "`interleaved_n_text`",
        ),
    ];
    for (pointer, value, key) in cases {
        let (_tmp, dir) = model_copy();
        let path = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        *cfg.pointer_mut(pointer).unwrap() = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = load_error(&dir);
        assert!(
            err.contains("config.json") && err.contains(key),
            "{pointer}: {err}"
        );
    }
}

#[test]
fn config_that_disagrees_with_the_weights_names_the_tensor() {
    // A valid config for another model: the weights do not fit it.
    let (_tmp, dir) = model_copy();
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4");
    std::fs::write(&path, text).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("k_proj.weight") && err.contains("expected [64, 64]"),
        "{err}"
    );
}

#[test]
fn missing_files_are_listed() {
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let (_tmp, dir) = model_copy();
        std::fs::remove_file(dir.join(file)).unwrap();
        let err = load_error(&dir);
        assert!(err.contains(file) && err.contains("missing"), "{err}");
    }
    let err = load_error(Path::new("/nonexistent/model"));
    assert!(err.contains("model directory"), "{err}");
}
