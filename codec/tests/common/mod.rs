//! Helpers shared by the codec tests: fixture paths, reference tensors, error measures.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lfm2_audio::format::Frame;

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The tiny-c model directory (LFM2 detokenizer and a small Mimi with its `mimi_config.json`).
pub fn tiny_c_model() -> PathBuf {
    fixtures().join("tiny-c/model")
}

/// `tiny-c/speech/decode.*`: 12 frames and what the reference made of them.
pub struct DecodeReference {
    pub frames: Vec<Frame>,
    pub tensors: HashMap<String, Tensor>,
}

impl DecodeReference {
    pub fn load() -> Self {
        let dir = fixtures().join("tiny-c/speech");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("decode.json")).unwrap())
                .unwrap();
        let codes: Vec<Vec<u32>> = serde_json::from_value(json["codes"].clone()).unwrap();
        assert_eq!(codes.len(), 8);
        let frames = (0..codes[0].len())
            .map(|t| std::array::from_fn(|c| codes[c][t]))
            .collect();
        let tensors =
            candle_core::safetensors::load(dir.join("decode.safetensors"), &Device::Cpu).unwrap();
        Self { frames, tensors }
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name} missing"))
    }

    pub fn samples(&self, name: &str) -> Vec<f32> {
        self.tensor(name).to_vec1::<f32>().unwrap()
    }
}

/// Every audio frame of a generation record that has no code 2048, in order.
pub fn recorded_frames(model: &str, recording: &str) -> Vec<Frame> {
    let path = fixtures()
        .join(model)
        .join("speech")
        .join(format!("{recording}.json"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["generate"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item.get("audio"))
        .map(|a| {
            let v: Vec<u32> = serde_json::from_value(a.clone()).unwrap();
            <Frame>::try_from(v.as_slice()).unwrap()
        })
        .filter(|f| f.iter().all(|&c| c < 2048))
        .collect()
}

/// (max abs error, max abs error / max |want|), asserting finite outputs.
pub fn errors(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut max_abs = 0f32;
    let mut scale = 0f32;
    for (a, b) in got.iter().zip(want) {
        assert!(a.is_finite(), "non-finite output");
        max_abs = max_abs.max((a - b).abs());
        scale = scale.max(b.abs());
    }
    (max_abs, max_abs / scale.max(f32::MIN_POSITIVE))
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts `got` is within `rel` of `want` relative to the largest reference magnitude, and
/// prints the numbers so a test run shows them.
pub fn assert_rel(what: &str, got: &Tensor, want: &Tensor, rel: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (abs, r) = errors(&flat(got), &flat(want));
    println!("{what}: max abs err {abs:.3e}, rel {r:.3e}");
    assert!(
        r <= rel,
        "{what}: relative error {r:.3e} > {rel:.1e} (max abs {abs:.3e})"
    );
}

/// Asserts the largest absolute difference is at most `tol`, printing it.
pub fn assert_abs(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    let (abs, r) = errors(got, want);
    println!("{what}: max abs err {abs:.3e} (rel {r:.3e})");
    assert!(abs <= tol, "{what}: max abs error {abs:.3e} > {tol:.1e}");
    abs
}

/// Copies the files of `src` (not recursively) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
}
