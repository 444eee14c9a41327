//! Helpers shared by the parity tests: fixture paths, reference tensors, error measures.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The real LFM2 tokenizer, fetched by the setup script (`tools/reference/fetch_tokenizer.py`)
/// into `assets/`, or named by `LFM2D_TOKENIZER`.
pub fn real_tokenizer() -> PathBuf {
    let path = std::env::var_os("LFM2D_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/lfm2-tokenizer.json")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `python3 tools/reference/fetch_tokenizer.py` (part of tools/setup.sh)",
        path.display()
    );
    path
}

pub struct Reference {
    pub json: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(model: &str) -> Self {
        let dir = fixtures().join(model);
        let json = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
        let json = serde_json::from_str(&json).expect("reference.json is JSON");
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .expect("reference.safetensors");
        Self { json, tensors }
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name} missing"))
    }

    pub fn ids(&self, pointer: &str) -> Vec<u32> {
        self.json
            .pointer(pointer)
            .and_then(|v| v.as_array())
            .unwrap_or_else(|| panic!("reference.json has no list at {pointer}"))
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    }
}

/// Error of `got` against `want`: (max abs error, max abs error / max |want|).
pub fn errors(got: &Tensor, want: &Tensor) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut max_abs = 0f32;
    let mut scale = 0f32;
    for (a, b) in g.iter().zip(&w) {
        assert!(a.is_finite(), "non-finite output");
        max_abs = max_abs.max((a - b).abs());
        scale = scale.max(b.abs());
    }
    (max_abs, max_abs / scale.max(f32::MIN_POSITIVE))
}

/// Asserts `got` is within `rel` (relative to the largest reference magnitude) of `want`, and
/// prints the numbers so a test run shows them.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rel: f32) {
    let (abs, r) = errors(got, want);
    println!("{what}: max abs err {abs:.3e}, rel {r:.3e}");
    assert!(
        r <= rel,
        "{what}: relative error {r:.3e} > {rel:.1e} (max abs {abs:.3e})"
    );
}
