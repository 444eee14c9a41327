//! The benchmark peer (candle-transformers' `quantized_lfm2` on a GGUF file of the backbone): it
//! runs, and the GGUF file computes the same model as lfm2d's f32 backbone.
//!
//! The measurement on a real-size checkpoint is an ignored test:
//!
//! ```text
//! LFM2D_PEER_MODEL=/path/to/model RAYON_NUM_THREADS=2 \
//!     cargo test --release --test bench_peer -- --ignored --nocapture
//! ```
//!
//! with optional `LFM2D_PEER_PROMPT` (512), `LFM2D_PEER_STEPS` (32), `LFM2D_PEER_RUNS` (3) and
//! `LFM2D_PEER_WORK` (a directory for the GGUF files, default: a temporary one).

#[path = "../src/bench_peer.rs"]
mod bench_peer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::quant::Format;
use lfm2_audio::session::Session;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a/model")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

fn last_row(t: &Tensor) -> Vec<f32> {
    let n = t.dim(0).unwrap();
    t.get(n - 1).unwrap().to_vec1().unwrap()
}

#[test]
fn peer_runs_on_the_tiny_model() {
    let work = tempfile::tempdir().unwrap();
    for format in [Format::Q8_0, Format::Q4_0] {
        let r = bench_peer::candle_quantized_lfm2(&tiny(), format, 24, 5, 3, work.path()).unwrap();
        assert_eq!(r.runs, 3);
        assert!(
            r.prefill_tok_s.is_finite() && r.prefill_tok_s > 0.0,
            "{format}: {r:?}"
        );
        assert!(
            r.decode_tok_s.is_finite() && r.decode_tok_s > 0.0,
            "{format}: {r:?}"
        );
    }
}

#[test]
fn peer_rejects_what_it_cannot_measure() {
    let work = tempfile::tempdir().unwrap();
    assert!(
        bench_peer::candle_quantized_lfm2(&tiny(), Format::Q8_0, 1, 4, 1, work.path()).is_err()
    );
    assert!(
        bench_peer::candle_quantized_lfm2(&tiny(), Format::Q8_0, 8, 4, 0, work.path()).is_err()
    );
}

#[test]
fn gguf_is_reused_while_the_checkpoint_is_unchanged() {
    let work = tempfile::tempdir().unwrap();
    let a = bench_peer::build_gguf(&tiny(), Format::Q4_0, work.path()).unwrap();
    let written = std::fs::metadata(&a).unwrap().modified().unwrap();
    let b = bench_peer::build_gguf(&tiny(), Format::Q4_0, work.path()).unwrap();
    assert_eq!(a, b);
    assert_eq!(std::fs::metadata(&b).unwrap().modified().unwrap(), written);
    let c = bench_peer::build_gguf(&tiny(), Format::Q8_0, work.path()).unwrap();
    assert_ne!(a, c);
}

/// Runs candle's model on `ids` and lfm2d's f32 backbone alongside: the first position alone, a
/// prompt of `prompt` tokens (none below 2), then single-token steps (convolution and attention
/// caches, rotary positions); `check` sees each position's logits, ours then candle's.
fn compare(gguf: &Path, ids: &[u32], prompt: usize, check: impl Fn(&str, &[f32], &[f32])) {
    let model = Lfm2AudioModel::load(&tiny()).unwrap();
    let backbone = Arc::clone(&model.backbone);
    let mut peer = bench_peer::load_gguf(gguf).unwrap();
    let input = |ids: &[u32]| {
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };

    let mut session = Session::new(Arc::clone(&backbone)).unwrap();
    let hidden = session.prefill_text(&ids[..1]).unwrap();
    let ours = last_row(&backbone.text_logits(&hidden).unwrap());
    check(
        "position 0",
        &ours,
        &flat(peer.forward(&input(&ids[..1]), 0).unwrap()),
    );
    if prompt < 2 {
        // Candle's model restarts only with a prefill of two tokens or more.
        return;
    }

    let mut session = Session::new(Arc::clone(&backbone)).unwrap();
    let hidden = session.prefill_text(&ids[..prompt]).unwrap();
    let ours = last_row(&backbone.text_logits(&hidden).unwrap());
    let theirs = flat(peer.forward(&input(&ids[..prompt]), 0).unwrap());
    check(&format!("prefill of {prompt}"), &ours, &theirs);
    for (pos, &id) in ids.iter().enumerate().skip(prompt) {
        let hidden = session.step_text(id).unwrap().unsqueeze(0).unwrap();
        let ours = last_row(&backbone.text_logits(&hidden).unwrap());
        let theirs = flat(peer.forward(&input(&[id]), pos).unwrap());
        check(&format!("step at {pos}"), &ours, &theirs);
    }
}

const IDS: [u32; 12] = [1, 6, 512, 77, 1999, 3, 1024, 250, 43, 1500, 8, 900];

/// With f32 matrices the GGUF file is the same model: names, shapes, the convolution kernel's
/// layout, the layer kinds and the metadata are all right.
#[test]
fn f32_gguf_computes_the_f32_backbone() {
    let work = tempfile::tempdir().unwrap();
    let gguf = bench_peer::build_gguf_as(&tiny(), GgmlDType::F32, work.path()).unwrap();
    compare(&gguf, &IDS, 8, |what, ours, theirs| {
        assert_eq!(ours.len(), theirs.len(), "{what}");
        let scale = ours.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = ours
            .iter()
            .zip(theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{what}: max difference {diff} (scale {scale})"
        );
    });
}

/// Candle's own quantization: Q8_0 keeps the top-1 token and a cosine above 0.99 everywhere. Q4_0
/// on a 64-wide random model is far noisier (lfm2d's own Q4_0 is too, down to ≈0.6 on some
/// positions), so only its first position is bounded.
#[test]
fn quantized_gguf_logits_agree_with_the_f32_backbone() {
    let work = tempfile::tempdir().unwrap();
    let gguf = bench_peer::build_gguf(&tiny(), Format::Q8_0, work.path()).unwrap();
    compare(&gguf, &IDS, 8, |what, ours, theirs| {
        let cos = cosine(ours, theirs);
        assert!(cos > 0.99, "Q8_0 {what}: cosine {cos}");
        assert_eq!(argmax(ours), argmax(theirs), "Q8_0 {what}: top-1");
    });
    let gguf = bench_peer::build_gguf(&tiny(), Format::Q4_0, work.path()).unwrap();
    compare(&gguf, &IDS[..1], 1, |what, ours, theirs| {
        let cos = cosine(ours, theirs);
        assert!(cos > 0.9, "Q4_0 {what}: cosine {cos}");
    });
}

/// The peer's numbers on a real-size checkpoint (see the file's documentation).
#[test]
#[ignore = "needs a real-size checkpoint in LFM2D_PEER_MODEL; takes minutes"]
fn measure_peer() {
    let env_usize = |key: &str, default: usize| {
        std::env::var(key)
            .ok()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{key}={v} is not a count"))
            })
            .unwrap_or(default)
    };
    let model = PathBuf::from(std::env::var("LFM2D_PEER_MODEL").expect("LFM2D_PEER_MODEL"));
    let prompt = env_usize("LFM2D_PEER_PROMPT", 512);
    let steps = env_usize("LFM2D_PEER_STEPS", 32);
    let runs = env_usize("LFM2D_PEER_RUNS", 3);
    let tmp = tempfile::tempdir().unwrap();
    let work = std::env::var("LFM2D_PEER_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_owned());
    println!(
        "candle quantized_lfm2, {} threads, prompt {prompt}, {steps} steps, {runs} runs",
        candle_core::utils::get_num_threads()
    );
    for format in [Format::Q8_0, Format::Q4_0] {
        let start = std::time::Instant::now();
        let r =
            bench_peer::candle_quantized_lfm2(&model, format, prompt, steps, runs, &work).unwrap();
        println!(
            "{format}: prefill {:.1} tok/s, decode {:.2} tok/s (median of {}; {:.0} s with GGUF build and load)",
            r.prefill_tok_s,
            r.decode_tok_s,
            r.runs,
            start.elapsed().as_secs_f64()
        );
    }
}
