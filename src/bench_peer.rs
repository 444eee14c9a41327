//! The peer that `lfm2d bench` measures next to lfm2d's own quantized backbone: candle-transformers'
//! `quantized_lfm2` (the LFM2 model of llama.cpp's GGUF files), run on the same shapes in the same
//! process.
//!
//! The backbone of an LFM2-Audio checkpoint is written as a GGUF file with llama.cpp's LFM2 tensor
//! names and `lfm2.*` metadata, its matrices quantized by candle itself (`QTensor::quantize`, as a
//! candle user would), norms and convolution kernels kept in f32. The file is kept in the work
//! directory and reused while the checkpoint and the format are unchanged.
//!
//! Threads: candle reads its thread counts from the environment once, at its first use in the
//! process: `RAYON_NUM_THREADS` for the f32 matmuls (run on rayon's pool, which reads the same
//! variable) and `CANDLE_NUM_THREADS` (default: `RAYON_NUM_THREADS`) for the pool of the quantized
//! matmuls, the calling thread included. Unset, candle uses the number of physical cores. Set them
//! before anything in the process touches candle, e.g. `RAYON_NUM_THREADS=2 lfm2d bench ...` for
//! two threads; changing them later has no effect.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor, D};
use candle_transformers::models::quantized_lfm2::ModelWeights;
use lfm2_audio::config::{LayerKind, Lfm2AudioConfig, Lfm2Config};
use lfm2_audio::quant::Format;
use lfm2_audio::weights::Weights;

/// Tensor-name prefix of the backbone in an LFM2-Audio checkpoint.
const PREFIX: &str = "lfm";

/// Metadata key naming the checkpoint a GGUF file was built from.
const SOURCE_KEY: &str = "lfm2d.source";

/// Throughput of the peer over `runs` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerResult {
    /// Median prompt tokens per second of one forward over the whole prompt.
    pub prefill_tok_s: f64,
    /// Median tokens per second of single-token forwards after the prompt (0 without steps).
    pub decode_tok_s: f64,
    pub runs: usize,
}

/// Builds a GGUF file of the backbone of the model in `model_dir` (an LFM2-Audio checkpoint in the
/// official layout: config.json section `lfm`, tensors `lfm.*` in model.safetensors) quantized to
/// `format` (Q8_0 or Q4_0), loads it with candle-transformers' quantized_lfm2, and measures prefill
/// of `prompt_len` tokens and `decode_steps` single-token decode steps (text logits included), `runs` times.
///
/// Each step feeds the greedy choice of the previous logits. One short untimed prefill and decode
/// step first lets candle repack its weights for its kernels (it does so at first use). The prompt
/// must hold at least two tokens: candle's model resets its caches only on a multi-token forward
/// at position 0, which is how every run starts afresh.
pub fn candle_quantized_lfm2(
    model_dir: &Path,
    format: Format,
    prompt_len: usize,
    decode_steps: usize,
    runs: usize,
    work_dir: &Path,
) -> Result<PeerResult> {
    ensure!(runs > 0, "the peer needs at least one run");
    ensure!(
        prompt_len >= 2,
        "the peer needs a prompt of at least 2 tokens (got {prompt_len})"
    );
    let cfg = backbone_config(model_dir)?;
    ensure!(
        prompt_len + decode_steps <= cfg.max_position_embeddings,
        "{prompt_len} + {decode_steps} positions exceed the model's context of {}",
        cfg.max_position_embeddings
    );
    let gguf = build_gguf(model_dir, format, work_dir)?;
    let mut model = load_gguf(&gguf)?;
    let prompt = prompt_ids(prompt_len, cfg.vocab_size);
    let device = Device::Cpu;

    let warm = prompt_len.min(16);
    let next = greedy(&model.forward(&row(&prompt[..warm], &device)?, 0)?)?;
    model.forward(&row(&[next], &device)?, warm)?;

    let mut prefill = Vec::with_capacity(runs);
    let mut decode = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let mut next = greedy(&model.forward(&row(&prompt, &device)?, 0)?)?;
        prefill.push(prompt_len as f64 / start.elapsed().as_secs_f64());

        let start = Instant::now();
        for step in 0..decode_steps {
            next = greedy(&model.forward(&row(&[next], &device)?, prompt_len + step)?)?;
        }
        let secs = start.elapsed().as_secs_f64();
        decode.push(if decode_steps == 0 {
            0.0
        } else {
            decode_steps as f64 / secs
        });
    }
    Ok(PeerResult {
        prefill_tok_s: median(prefill),
        decode_tok_s: median(decode),
        runs,
    })
}

/// Writes (or finds, when already built from the same checkpoint and format) the GGUF file of the
/// backbone of `model_dir` in `work_dir`, and returns its path.
pub fn build_gguf(model_dir: &Path, format: Format, work_dir: &Path) -> Result<PathBuf> {
    let dtype = match format {
        Format::Q8_0 => GgmlDType::Q8_0,
        Format::Q4_0 => GgmlDType::Q4_0,
        Format::Q4_K => GgmlDType::Q4K,
        Format::Q6_K => GgmlDType::Q6K,
    };
    build_gguf_as(model_dir, dtype, work_dir)
}

/// [`build_gguf`] with the matrices stored as any type candle can quantize to (`F32` gives the
/// exact model, to check the file's layout against lfm2d's own f32 backbone).
pub fn build_gguf_as(model_dir: &Path, dtype: GgmlDType, work_dir: &Path) -> Result<PathBuf> {
    let cfg = backbone_config(model_dir)?;
    check_supported(&cfg, dtype)?;
    let weights_path = model_dir.join("model.safetensors");
    let source = source_id(&weights_path, dtype)?;
    let kind = format!("{dtype:?}").to_ascii_lowercase();
    let out = work_dir.join(format!("candle-lfm2-{kind}.gguf"));
    if built_from(&out).as_deref() == Some(source.as_str()) {
        return Ok(out);
    }

    let w = Weights::open(&weights_path)?;
    let h = cfg.hidden_size;
    let mut tensors = Vec::new();
    let mut matrix = |gguf: String, name: String, rows: usize, cols: usize| -> Result<()> {
        let t = w.get(&name, &[rows, cols])?;
        let q = QTensor::quantize(&t, dtype).with_context(|| format!("quantizing {name}"))?;
        tensors.push((gguf, q));
        Ok(())
    };
    matrix(
        "token_embd.weight".into(),
        format!("{PREFIX}.embed_tokens.weight"),
        cfg.vocab_size,
        h,
    )?;
    for (i, kind) in cfg.layer_types.iter().enumerate() {
        let p = format!("{PREFIX}.layers.{i}");
        let ff = format!("{p}.feed_forward");
        matrix(
            format!("blk.{i}.ffn_gate.weight"),
            format!("{ff}.w1.weight"),
            cfg.ff_dim,
            h,
        )?;
        matrix(
            format!("blk.{i}.ffn_down.weight"),
            format!("{ff}.w2.weight"),
            h,
            cfg.ff_dim,
        )?;
        matrix(
            format!("blk.{i}.ffn_up.weight"),
            format!("{ff}.w3.weight"),
            cfg.ff_dim,
            h,
        )?;
        match kind {
            LayerKind::Conv => {
                let c = format!("{p}.conv");
                let sc = format!("blk.{i}.shortconv");
                matrix(
                    format!("{sc}.in_proj.weight"),
                    format!("{c}.in_proj.weight"),
                    3 * h,
                    h,
                )?;
                matrix(
                    format!("{sc}.out_proj.weight"),
                    format!("{c}.out_proj.weight"),
                    h,
                    h,
                )?;
            }
            LayerKind::Attention => {
                let a = format!("{p}.self_attn");
                let q = cfg.num_attention_heads * cfg.head_dim;
                let kv = cfg.num_key_value_heads * cfg.head_dim;
                matrix(
                    format!("blk.{i}.attn_q.weight"),
                    format!("{a}.q_proj.weight"),
                    q,
                    h,
                )?;
                matrix(
                    format!("blk.{i}.attn_k.weight"),
                    format!("{a}.k_proj.weight"),
                    kv,
                    h,
                )?;
                matrix(
                    format!("blk.{i}.attn_v.weight"),
                    format!("{a}.v_proj.weight"),
                    kv,
                    h,
                )?;
                matrix(
                    format!("blk.{i}.attn_output.weight"),
                    format!("{a}.out_proj.weight"),
                    h,
                    q,
                )?;
            }
        }
    }

    let mut vector = |gguf: String, t: Tensor| -> Result<()> {
        tensors.push((gguf, QTensor::quantize(&t, GgmlDType::F32)?));
        Ok(())
    };
    vector(
        "token_embd_norm.weight".into(),
        w.get(&format!("{PREFIX}.embedding_norm.weight"), &[h])?,
    )?;
    for (i, kind) in cfg.layer_types.iter().enumerate() {
        let p = format!("{PREFIX}.layers.{i}");
        let b = format!("blk.{i}");
        vector(
            format!("{b}.attn_norm.weight"),
            w.get(&format!("{p}.operator_norm.weight"), &[h])?,
        )?;
        vector(
            format!("{b}.ffn_norm.weight"),
            w.get(&format!("{p}.ffn_norm.weight"), &[h])?,
        )?;
        match kind {
            LayerKind::Conv => {
                // llama.cpp's layout: `[hidden, kernel]` (the checkpoint's `[hidden, 1, kernel]`).
                let k = cfg.conv_kernel;
                let conv = w.get(&format!("{p}.conv.conv.weight"), &[h, 1, k])?;
                vector(format!("{b}.shortconv.conv.weight"), conv.reshape((h, k))?)?;
            }
            LayerKind::Attention => {
                let a = format!("{p}.self_attn");
                let hd = cfg.head_dim;
                vector(
                    format!("{b}.attn_q_norm.weight"),
                    w.get(&format!("{a}.q_layernorm.weight"), &[hd])?,
                )?;
                vector(
                    format!("{b}.attn_k_norm.weight"),
                    w.get(&format!("{a}.k_layernorm.weight"), &[hd])?,
                )?;
            }
        }
    }

    let u32_of = |n: usize| -> Result<Value> {
        Ok(Value::U32(
            u32::try_from(n).context("a model dimension does not fit GGUF's u32")?,
        ))
    };
    let kv_heads = cfg
        .layer_types
        .iter()
        .map(|kind| match kind {
            LayerKind::Conv => u32_of(0),
            LayerKind::Attention => u32_of(cfg.num_key_value_heads),
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = vec![
        ("general.architecture", Value::String("lfm2".into())),
        (SOURCE_KEY, Value::String(source)),
        ("lfm2.vocab_size", u32_of(cfg.vocab_size)?),
        ("lfm2.context_length", u32_of(cfg.max_position_embeddings)?),
        ("lfm2.embedding_length", u32_of(h)?),
        ("lfm2.feed_forward_length", u32_of(cfg.ff_dim)?),
        ("lfm2.block_count", u32_of(cfg.num_layers())?),
        (
            "lfm2.attention.head_count",
            u32_of(cfg.num_attention_heads)?,
        ),
        ("lfm2.attention.head_count_kv", Value::Array(kv_heads)),
        (
            "lfm2.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.norm_eps as f32),
        ),
        ("lfm2.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("lfm2.shortconv.l_cache", u32_of(cfg.conv_kernel)?),
    ];

    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let tmp = out.with_extension("gguf.part");
    {
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut writer = BufWriter::new(file);
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut writer, &md, &ts)
            .with_context(|| format!("writing {}", tmp.display()))?;
        writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(out)
}

/// Loads a GGUF file with candle-transformers' `quantized_lfm2`, on the CPU.
pub fn load_gguf(path: &Path) -> Result<ModelWeights> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("reading {}", path.display()))?;
    ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)
        .with_context(|| format!("loading {} with quantized_lfm2", path.display()))
}

fn backbone_config(model_dir: &Path) -> Result<Lfm2Config> {
    Ok(Lfm2AudioConfig::from_file(&model_dir.join("config.json"))?.lfm)
}

/// What candle's LFM2 cannot express, or candle's quantization cannot store.
fn check_supported(cfg: &Lfm2Config, dtype: GgmlDType) -> Result<()> {
    ensure!(!cfg.conv_bias, "quantized_lfm2 has no convolution biases");
    ensure!(
        cfg.sliding_window.is_none(),
        "quantized_lfm2 has no sliding-window attention"
    );
    ensure!(
        cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size,
        "quantized_lfm2 takes the head width as hidden / heads ({} / {}), not {}",
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim
    );
    let block = dtype.block_size();
    ensure!(
        cfg.hidden_size.is_multiple_of(block) && cfg.ff_dim.is_multiple_of(block),
        "hidden ({}) and feed-forward ({}) widths must be multiples of {dtype:?}'s {block}-value block",
        cfg.hidden_size,
        cfg.ff_dim
    );
    Ok(())
}

/// Identifies a checkpoint file (path, size, modification time) and a storage type.
fn source_id(weights: &Path, dtype: GgmlDType) -> Result<String> {
    let meta = std::fs::metadata(weights)
        .with_context(|| format!("reading the metadata of {}", weights.display()))?;
    let path = weights
        .canonicalize()
        .unwrap_or_else(|_| weights.to_owned());
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!(
        "{}|{}|{modified}|{dtype:?}",
        path.display(),
        meta.len()
    ))
}

/// The source a GGUF file records, if it is a readable GGUF file.
fn built_from(path: &Path) -> Option<String> {
    let mut reader = BufReader::new(File::open(path).ok()?);
    let content = gguf_file::Content::read(&mut reader).ok()?;
    content.metadata.get(SOURCE_KEY)?.to_string().ok().cloned()
}

/// A reproducible pseudo-random prompt of token ids below `vocab`.
fn prompt_ids(len: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// `ids` as a batch of one: `[1, len]`.
fn row(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// The most likely token of logits `[1, vocab]`.
fn greedy(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0])
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
