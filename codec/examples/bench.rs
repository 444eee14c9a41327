//! Time per frame of the decoders, streaming (one `push` per frame) and batch.
//!
//! ```sh
//! cargo run --release -p codec --example bench -- [--frames N] [--no-real] [MODEL_DIR ...]
//! ```
//!
//! Without a model directory it measures the tiny-c fixture decoders and, unless `--no-real`,
//! both decoders at their real sizes (LFM2.5-Audio's detokenizer and Mimi v0.1) with random
//! weights written to a temporary directory. The codes are pseudo-random; the decoders' cost
//! does not depend on them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use codec::{open_detokenizer, Detokenizer, DetokenizerChoice};
use lfm2_audio::format::{Frame, SAMPLES_PER_FRAME};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut frames = 100usize;
    let mut real = true;
    let mut dirs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--frames" => frames = args.next().ok_or("--frames needs a value")?.parse()?,
            "--no-real" => real = false,
            _ => dirs.push(PathBuf::from(a)),
        }
    }
    let _tmp;
    if dirs.is_empty() {
        dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-c/model"));
        if real {
            let tmp = tempfile::tempdir()?;
            eprintln!(
                "writing real-size random weights to {}",
                tmp.path().display()
            );
            write_real_size(tmp.path())?;
            dirs.push(tmp.path().to_owned());
            _tmp = tmp;
        }
    }
    println!(
        "threads: {}  frames: {frames} (80 ms of audio each)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let codes = pseudo_random_frames(frames);
    for dir in &dirs {
        for choice in [DetokenizerChoice::Lfm2, DetokenizerChoice::Mimi] {
            let start = Instant::now();
            let mut d = match open_detokenizer(dir, choice) {
                Ok(d) => d,
                Err(e) => {
                    println!("{} {choice:?}: not measured ({e})", dir.display());
                    continue;
                }
            };
            let load = start.elapsed().as_secs_f64();
            measure(
                &format!("{} {choice:?}", dir.display()),
                d.as_mut(),
                &codes,
                load,
            )?;
        }
    }
    Ok(())
}

fn measure(
    name: &str,
    d: &mut dyn Detokenizer,
    frames: &[Frame],
    load_s: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    // One warm-up utterance so that allocations and caches are in their steady state.
    for f in frames.iter().take(10) {
        d.push(f)?;
    }
    d.flush()?;
    let mut out = Vec::with_capacity(frames.len() * SAMPLES_PER_FRAME);
    let mut times = Vec::with_capacity(frames.len());
    for f in frames {
        let t = Instant::now();
        d.push_into(f, &mut out)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    d.flush_into(&mut out)?;
    let t = Instant::now();
    let batch = d.decode(frames)?;
    let batch_ms = t.elapsed().as_secs_f64() * 1e3 / frames.len() as f64;
    let diff = out
        .iter()
        .zip(&batch)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    times.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name}: load {load_s:.2} s | push median {:.2} ms, p90 {:.2} ms, max {:.2} ms per frame \
         (real-time factor {:.3}) | batch {batch_ms:.2} ms per frame | streaming vs batch {diff:.1e}",
        pct(0.5),
        pct(0.9),
        pct(1.0),
        pct(0.5) / 80.0,
    );
    Ok(())
}

fn pseudo_random_frames(n: usize) -> Vec<Frame> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            std::array::from_fn(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2048) as u32
            })
        })
        .collect()
}

/// Writes an LFM2.5-Audio `audio_detokenizer/` and a Mimi v0.1 checkpoint (decoder half) with
/// random weights of the real shapes.
fn write_real_size(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut t = Tensors::default();

    // LFM2 detokenizer: hidden 512, 8 layers, attention at 2, 4, 6, 16/8 heads, FFN 2304.
    let (h, ff) = (512, 2304);
    let kinds = [
        "conv",
        "conv",
        "sliding_attention",
        "conv",
        "sliding_attention",
        "conv",
        "sliding_attention",
        "conv",
    ];
    t.randn("emb.emb.weight", &[16384, h], 1.0);
    for (i, kind) in kinds.iter().enumerate() {
        let p = format!("lfm.layers.{i}");
        t.ones(&format!("{p}.operator_norm.weight"), &[h]);
        t.ones(&format!("{p}.ffn_norm.weight"), &[h]);
        t.linear(&format!("{p}.feed_forward.w1.weight"), ff, h);
        t.linear(&format!("{p}.feed_forward.w3.weight"), ff, h);
        t.linear(&format!("{p}.feed_forward.w2.weight"), h, ff);
        if *kind == "conv" {
            t.linear(&format!("{p}.conv.in_proj.weight"), 3 * h, h);
            t.randn(&format!("{p}.conv.conv.weight"), &[h, 1, 3], 0.5);
            t.linear(&format!("{p}.conv.out_proj.weight"), h, h);
        } else {
            t.linear(&format!("{p}.self_attn.q_proj.weight"), h, h);
            t.linear(&format!("{p}.self_attn.k_proj.weight"), 256, h);
            t.linear(&format!("{p}.self_attn.v_proj.weight"), 256, h);
            t.linear(&format!("{p}.self_attn.out_proj.weight"), h, h);
            t.ones(&format!("{p}.self_attn.q_layernorm.weight"), &[32]);
            t.ones(&format!("{p}.self_attn.k_layernorm.weight"), &[32]);
        }
    }
    t.ones("lfm.embedding_norm.weight", &[h]);
    // Small output weights keep exp(log-magnitude) in range.
    t.randn("lin.weight", &[1282, h], 0.01);
    t.randn("lin.bias", &[1282], 0.01);
    let detok = dir.join("audio_detokenizer");
    std::fs::create_dir_all(&detok)?;
    t.save(&detok.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["Lfm25AudioTokenizer"], "model_type": "lfm2",
        "hidden_size": h, "num_hidden_layers": 8, "layer_types": kinds,
        "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 3328,
        "block_auto_adjust_ff_dim": true, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
        "conv_L_cache": 3, "conv_bias": false, "norm_eps": 1e-5, "rope_theta": 1e6,
        "sliding_window": 30, "output_size": 1282, "vocab_size": 65536,
        "max_position_embeddings": 128000,
    });
    std::fs::write(
        detok.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;

    // Mimi v0.1 decode path.
    let mut t = Tensors::default();
    for (name, n) in [("rvq_first", 1), ("rvq_rest", 7)] {
        for i in 0..n {
            let p = format!("quantizer.{name}.vq.layers.{i}._codebook");
            t.randn(&format!("{p}.embedding_sum"), &[2048, 256], 1.0);
            t.ones(&format!("{p}.cluster_usage"), &[2048]);
        }
        t.conv(
            &format!("quantizer.{name}.output_proj.weight"),
            &[512, 256, 1],
        );
    }
    t.conv("upsample.convtr.convtr.convtr.weight", &[512, 1, 4]);
    for i in 0..8 {
        let p = format!("decoder_transformer.transformer.layers.{i}");
        t.linear(&format!("{p}.self_attn.in_projs.0.weight"), 1536, 512);
        t.linear(&format!("{p}.self_attn.out_projs.0.weight"), 512, 512);
        t.linear(&format!("{p}.linear1.weight"), 2048, 512);
        t.linear(&format!("{p}.linear2.weight"), 512, 2048);
        for n in ["norm1", "norm2"] {
            t.ones(&format!("{p}.{n}.weight"), &[512]);
            t.randn(&format!("{p}.{n}.bias"), &[512], 0.1);
        }
        t.randn(&format!("{p}.layer_scale_1.scale"), &[512], 0.01);
        t.randn(&format!("{p}.layer_scale_2.scale"), &[512], 0.01);
    }
    t.conv("decoder.model.0.conv.conv.weight", &[1024, 512, 7]);
    t.randn("decoder.model.0.conv.conv.bias", &[1024], 0.1);
    let mut ch = 1024;
    for (stage, ratio) in [8usize, 6, 5, 4].into_iter().enumerate() {
        let i = 2 + 3 * stage;
        t.conv(
            &format!("decoder.model.{i}.convtr.convtr.weight"),
            &[ch, ch / 2, 2 * ratio],
        );
        t.randn(
            &format!("decoder.model.{i}.convtr.convtr.bias"),
            &[ch / 2],
            0.1,
        );
        let r = format!("decoder.model.{}.block", i + 1);
        t.conv(&format!("{r}.1.conv.conv.weight"), &[ch / 4, ch / 2, 3]);
        t.randn(&format!("{r}.1.conv.conv.bias"), &[ch / 4], 0.1);
        t.conv(&format!("{r}.3.conv.conv.weight"), &[ch / 2, ch / 4, 1]);
        t.randn(&format!("{r}.3.conv.conv.bias"), &[ch / 2], 0.1);
        ch /= 2;
    }
    t.conv("decoder.model.14.conv.conv.weight", &[1, 64, 3]);
    t.randn("decoder.model.14.conv.conv.bias", &[1], 0.1);
    t.save(&dir.join(lfm2_audio::model::MIMI_FILE))?;
    Ok(())
}

#[derive(Default)]
struct Tensors(HashMap<String, Tensor>);

impl Tensors {
    fn randn(&mut self, name: &str, shape: &[usize], std: f64) {
        let t = Tensor::randn(0f32, std as f32, shape, &Device::Cpu).expect("randn");
        self.0.insert(name.to_owned(), t);
    }

    fn ones(&mut self, name: &str, shape: &[usize]) {
        let t = Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).expect("ones");
        self.0.insert(name.to_owned(), t);
    }

    /// `[out, in]` with variance 1/in.
    fn linear(&mut self, name: &str, out: usize, inp: usize) {
        self.randn(name, &[out, inp], 1.0 / (inp as f64).sqrt());
    }

    /// A convolution weight with variance 1/(shape[1]·shape[2]).
    fn conv(&mut self, name: &str, shape: &[usize]) {
        self.randn(name, shape, 1.0 / ((shape[1] * shape[2]) as f64).sqrt());
    }

    fn save(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        candle_core::safetensors::save(&self.0, path)?;
        Ok(())
    }
}
