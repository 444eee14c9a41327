//! `lfm2d synth-model`: writes a random-weight checkpoint in the official layout, with the real
//! LFM2.5-Audio-1.5B shapes (or a tiny variant), so anyone can run and benchmark lfm2d without the
//! real weights. Speed does not depend on the values; the outputs are noise.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// The shapes of LiquidAI/LFM2.5-Audio-1.5B (≈1.5 B parameters, 3 GB in bf16).
    #[value(name = "1.5b")]
    Full,
    /// A few-megabyte model with the same structure.
    Tiny,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "1.5b")]
    pub size: Size,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The LFM2 tokenizer to copy (default: assets/lfm2-tokenizer.json, fetched by tools/setup.sh).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// How a tensor is filled.
#[derive(Clone, Copy, Debug)]
enum Init {
    Normal(f32),
    Const(f32),
    /// `codebook_offsets`: c · 2049, int64.
    Offsets,
    /// A periodic Hann window.
    Hann,
    /// An int64 scalar zero (BatchNorm's `num_batches_tracked`).
    ZeroI64,
}

struct Entry {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Shapes of one model size.
struct Dims {
    hidden: usize,
    layers: usize,
    attn: Vec<usize>,
    heads: usize,
    kv_heads: usize,
    ff: usize,
    vocab: usize,
    enc_d: usize,
    enc_layers: usize,
    enc_heads: usize,
    enc_channels: usize,
    depth_dim: usize,
    depth_layers: usize,
    det_hidden: usize,
    det_layers: Vec<&'static str>,
    det_heads: usize,
    det_kv: usize,
    det_ff: usize,
}

impl Dims {
    fn of(size: Size) -> Self {
        match size {
            Size::Full => Self {
                hidden: 2048,
                layers: 16,
                attn: vec![2, 5, 8, 10, 12, 14],
                heads: 32,
                kv_heads: 8,
                ff: 12288,
                vocab: 65536,
                enc_d: 512,
                enc_layers: 17,
                enc_heads: 8,
                enc_channels: 256,
                depth_dim: 1024,
                depth_layers: 6,
                det_hidden: 512,
                det_layers: vec![
                    "conv",
                    "conv",
                    "sliding_attention",
                    "conv",
                    "sliding_attention",
                    "conv",
                    "sliding_attention",
                    "conv",
                ],
                det_heads: 16,
                det_kv: 8,
                det_ff: 3328,
            },
            Size::Tiny => Self {
                hidden: 64,
                layers: 4,
                attn: vec![1, 3],
                heads: 4,
                kv_heads: 2,
                ff: 384,
                vocab: 65536,
                enc_d: 64,
                enc_layers: 2,
                enc_heads: 4,
                enc_channels: 16,
                depth_dim: 64,
                depth_layers: 2,
                det_hidden: 64,
                det_layers: vec!["conv", "sliding_attention", "conv", "sliding_attention"],
                det_heads: 4,
                det_kv: 2,
                det_ff: 384,
            },
        }
    }
}

/// The auto-adjusted feed-forward width of LFM2 (multiplier 1.0, multiple of 256).
fn ff_width(ff: usize) -> usize {
    256 * ((2 * ff) / 3).div_ceil(256)
}

fn push(list: &mut Vec<Entry>, name: impl Into<String>, shape: &[usize], init: Init) {
    list.push(Entry {
        name: name.into(),
        shape: shape.to_vec(),
        init,
    });
}

/// The LFM2 stack's tensors under `prefix` (layers, final norm, embeddings).
#[allow(clippy::too_many_arguments)]
fn lfm2_entries(
    list: &mut Vec<Entry>,
    prefix: &str,
    hidden: usize,
    kinds: &[bool],
    heads: usize,
    kv: usize,
    ff: usize,
    vocab: usize,
) {
    let hd = hidden / heads;
    let w = 1.0 / (hidden as f32).sqrt();
    push(
        list,
        format!("{prefix}.embed_tokens.weight"),
        &[vocab, hidden],
        Init::Normal(1.0),
    );
    push(
        list,
        format!("{prefix}.embedding_norm.weight"),
        &[hidden],
        Init::Const(1.0),
    );
    for (i, &attn) in kinds.iter().enumerate() {
        let p = format!("{prefix}.layers.{i}");
        push(
            list,
            format!("{p}.operator_norm.weight"),
            &[hidden],
            Init::Const(1.0),
        );
        push(
            list,
            format!("{p}.ffn_norm.weight"),
            &[hidden],
            Init::Const(1.0),
        );
        push(
            list,
            format!("{p}.feed_forward.w1.weight"),
            &[ff, hidden],
            Init::Normal(w),
        );
        push(
            list,
            format!("{p}.feed_forward.w3.weight"),
            &[ff, hidden],
            Init::Normal(w),
        );
        push(
            list,
            format!("{p}.feed_forward.w2.weight"),
            &[hidden, ff],
            Init::Normal(0.5 / (ff as f32).sqrt()),
        );
        if attn {
            let a = format!("{p}.self_attn");
            push(
                list,
                format!("{a}.q_proj.weight"),
                &[hidden, hidden],
                Init::Normal(w),
            );
            push(
                list,
                format!("{a}.k_proj.weight"),
                &[kv * hd, hidden],
                Init::Normal(w),
            );
            push(
                list,
                format!("{a}.v_proj.weight"),
                &[kv * hd, hidden],
                Init::Normal(w),
            );
            push(
                list,
                format!("{a}.out_proj.weight"),
                &[hidden, hidden],
                Init::Normal(0.5 * w),
            );
            push(
                list,
                format!("{a}.q_layernorm.weight"),
                &[hd],
                Init::Const(1.0),
            );
            push(
                list,
                format!("{a}.k_layernorm.weight"),
                &[hd],
                Init::Const(1.0),
            );
        } else {
            let c = format!("{p}.conv");
            push(
                list,
                format!("{c}.in_proj.weight"),
                &[3 * hidden, hidden],
                Init::Normal(w),
            );
            push(
                list,
                format!("{c}.conv.weight"),
                &[hidden, 1, 3],
                Init::Normal(0.5),
            );
            push(
                list,
                format!("{c}.out_proj.weight"),
                &[hidden, hidden],
                Init::Normal(0.5 * w),
            );
        }
    }
}

fn model_entries(d: &Dims) -> Vec<Entry> {
    let mut l = Vec::new();
    let kinds: Vec<bool> = (0..d.layers).map(|i| d.attn.contains(&i)).collect();
    lfm2_entries(
        &mut l,
        "lfm",
        d.hidden,
        &kinds,
        d.heads,
        d.kv_heads,
        ff_width(d.ff),
        d.vocab,
    );

    // Conformer encoder and adapter.
    let (e, c) = (d.enc_d, d.enc_channels);
    let pe = "conformer.pre_encode";
    push(
        &mut l,
        format!("{pe}.conv.0.weight"),
        &[c, 1, 3, 3],
        Init::Normal(0.3),
    );
    push(&mut l, format!("{pe}.conv.0.bias"), &[c], Init::Const(0.0));
    for i in [2, 5] {
        push(
            &mut l,
            format!("{pe}.conv.{i}.weight"),
            &[c, 1, 3, 3],
            Init::Normal(0.3),
        );
        push(
            &mut l,
            format!("{pe}.conv.{i}.bias"),
            &[c],
            Init::Const(0.0),
        );
        push(
            &mut l,
            format!("{pe}.conv.{}.weight", i + 1),
            &[c, c, 1, 1],
            Init::Normal(1.0 / (c as f32).sqrt()),
        );
        push(
            &mut l,
            format!("{pe}.conv.{}.bias", i + 1),
            &[c],
            Init::Const(0.0),
        );
    }
    push(
        &mut l,
        format!("{pe}.out.weight"),
        &[e, c * 16],
        Init::Normal(1.0 / ((c * 16) as f32).sqrt()),
    );
    push(&mut l, format!("{pe}.out.bias"), &[e], Init::Const(0.0));
    let we = 1.0 / (e as f32).sqrt();
    for i in 0..d.enc_layers {
        let p = format!("conformer.layers.{i}");
        for n in [
            "norm_feed_forward1",
            "norm_self_att",
            "norm_conv",
            "norm_feed_forward2",
            "norm_out",
        ] {
            push(&mut l, format!("{p}.{n}.weight"), &[e], Init::Const(1.0));
            push(&mut l, format!("{p}.{n}.bias"), &[e], Init::Const(0.0));
        }
        for f in ["feed_forward1", "feed_forward2"] {
            push(
                &mut l,
                format!("{p}.{f}.linear1.weight"),
                &[4 * e, e],
                Init::Normal(we),
            );
            push(
                &mut l,
                format!("{p}.{f}.linear1.bias"),
                &[4 * e],
                Init::Const(0.0),
            );
            push(
                &mut l,
                format!("{p}.{f}.linear2.weight"),
                &[e, 4 * e],
                Init::Normal(0.5 * we),
            );
            push(
                &mut l,
                format!("{p}.{f}.linear2.bias"),
                &[e],
                Init::Const(0.0),
            );
        }
        for n in ["linear_q", "linear_k", "linear_v", "linear_out"] {
            push(
                &mut l,
                format!("{p}.self_attn.{n}.weight"),
                &[e, e],
                Init::Normal(we),
            );
            push(
                &mut l,
                format!("{p}.self_attn.{n}.bias"),
                &[e],
                Init::Const(0.0),
            );
        }
        push(
            &mut l,
            format!("{p}.self_attn.linear_pos.weight"),
            &[e, e],
            Init::Normal(we),
        );
        push(
            &mut l,
            format!("{p}.self_attn.pos_bias_u"),
            &[d.enc_heads, e / d.enc_heads],
            Init::Normal(0.02),
        );
        push(
            &mut l,
            format!("{p}.self_attn.pos_bias_v"),
            &[d.enc_heads, e / d.enc_heads],
            Init::Normal(0.02),
        );
        push(
            &mut l,
            format!("{p}.conv.pointwise_conv1.weight"),
            &[2 * e, e, 1],
            Init::Normal(we),
        );
        push(
            &mut l,
            format!("{p}.conv.pointwise_conv1.bias"),
            &[2 * e],
            Init::Const(0.0),
        );
        push(
            &mut l,
            format!("{p}.conv.depthwise_conv.weight"),
            &[e, 1, 9],
            Init::Normal(0.3),
        );
        push(
            &mut l,
            format!("{p}.conv.depthwise_conv.bias"),
            &[e],
            Init::Const(0.0),
        );
        push(
            &mut l,
            format!("{p}.conv.batch_norm.weight"),
            &[e],
            Init::Const(1.0),
        );
        push(
            &mut l,
            format!("{p}.conv.batch_norm.bias"),
            &[e],
            Init::Const(0.0),
        );
        push(
            &mut l,
            format!("{p}.conv.batch_norm.running_mean"),
            &[e],
            Init::Const(0.0),
        );
        push(
            &mut l,
            format!("{p}.conv.batch_norm.running_var"),
            &[e],
            Init::Const(1.0),
        );
        push(
            &mut l,
            format!("{p}.conv.batch_norm.num_batches_tracked"),
            &[],
            Init::ZeroI64,
        );
        push(
            &mut l,
            format!("{p}.conv.pointwise_conv2.weight"),
            &[e, e, 1],
            Init::Normal(we),
        );
        push(
            &mut l,
            format!("{p}.conv.pointwise_conv2.bias"),
            &[e],
            Init::Const(0.0),
        );
    }
    let h = d.hidden;
    push(
        &mut l,
        "audio_adapter.model.0.weight",
        &[e],
        Init::Const(1.0),
    );
    push(&mut l, "audio_adapter.model.0.bias", &[e], Init::Const(0.0));
    push(
        &mut l,
        "audio_adapter.model.1.weight",
        &[h, e],
        Init::Normal(we),
    );
    push(&mut l, "audio_adapter.model.1.bias", &[h], Init::Const(0.0));
    push(
        &mut l,
        "audio_adapter.model.3.weight",
        &[h, h],
        Init::Normal(1.0 / (h as f32).sqrt()),
    );
    push(&mut l, "audio_adapter.model.3.bias", &[h], Init::Const(0.0));

    // Audio output head.
    let (dd, books) = (d.depth_dim, 8);
    let hd = dd / 32;
    let dff = ff_width(4 * dd);
    push(
        &mut l,
        "audio_embedding.embedding.weight",
        &[books * 2049, h],
        Init::Normal(0.3),
    );
    push(
        &mut l,
        "audio_embedding.embedding_norm.weight",
        &[h],
        Init::Const(1.0),
    );
    push(
        &mut l,
        "audio_embedding.to_logits.weight",
        &[books * 2049, h],
        Init::Normal(0.02),
    );
    push(&mut l, "codebook_offsets", &[books], Init::Offsets);
    push(&mut l, "audio_loss_weights", &[books], Init::Const(1.0));
    push(
        &mut l,
        "depth_linear.weight",
        &[books * dd, h],
        Init::Normal(1.0 / (h as f32).sqrt()),
    );
    push(&mut l, "depth_linear.bias", &[books * dd], Init::Const(0.0));
    let wd = 1.0 / (dd as f32).sqrt();
    for i in 0..d.depth_layers {
        let p = format!("depthformer.layers.{i}");
        push(
            &mut l,
            format!("{p}.operator.qkv_proj.weight"),
            &[dd + 2 * 8 * hd, dd],
            Init::Normal(wd),
        );
        push(
            &mut l,
            format!("{p}.operator.out_proj.weight"),
            &[dd, dd],
            Init::Normal(0.5 * wd),
        );
        push(
            &mut l,
            format!("{p}.operator.bounded_attention.q_layernorm.weight"),
            &[hd],
            Init::Const(1.0),
        );
        push(
            &mut l,
            format!("{p}.operator.bounded_attention.k_layernorm.weight"),
            &[hd],
            Init::Const(1.0),
        );
        push(
            &mut l,
            format!("{p}.operator_norm.weight"),
            &[dd],
            Init::Const(1.0),
        );
        push(
            &mut l,
            format!("{p}.ffn_norm.weight"),
            &[dd],
            Init::Const(1.0),
        );
        push(
            &mut l,
            format!("{p}.feed_forward.w1.weight"),
            &[dff, dd],
            Init::Normal(wd),
        );
        push(
            &mut l,
            format!("{p}.feed_forward.w3.weight"),
            &[dff, dd],
            Init::Normal(wd),
        );
        push(
            &mut l,
            format!("{p}.feed_forward.w2.weight"),
            &[dd, dff],
            Init::Normal(0.5 / (dff as f32).sqrt()),
        );
    }
    for c in 0..books {
        let p = format!("depth_embeddings.{c}");
        push(
            &mut l,
            format!("{p}.embedding.weight"),
            &[2049, dd],
            Init::Normal(0.3),
        );
        push(
            &mut l,
            format!("{p}.embedding_norm.weight"),
            &[dd],
            Init::Const(1.0),
        );
        push(
            &mut l,
            format!("{p}.to_logits.weight"),
            &[2049, dd],
            Init::Normal(wd),
        );
    }
    l
}

fn detokenizer_entries(d: &Dims) -> Vec<Entry> {
    let mut l = Vec::new();
    let kinds: Vec<bool> = d.det_layers.iter().map(|k| *k != "conv").collect();
    lfm2_entries(
        &mut l,
        "lfm",
        d.det_hidden,
        &kinds,
        d.det_heads,
        d.det_kv,
        ff_width(d.det_ff),
        d.vocab,
    );
    push(
        &mut l,
        "emb.emb.weight",
        &[8 * 2048, d.det_hidden],
        Init::Normal(1.0),
    );
    push(
        &mut l,
        "lin.weight",
        &[1282, d.det_hidden],
        Init::Normal(0.3 / (d.det_hidden as f32).sqrt()),
    );
    push(&mut l, "lin.bias", &[1282], Init::Const(0.0));
    push(&mut l, "istft.window", &[1280], Init::Hann);
    l
}

fn model_config(d: &Dims) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Lfm2AudioForConditionalGeneration"],
        "codebooks": 8,
        "tie_audio_embeddings": false,
        "semantic_codebook_factor": 100,
        "codebook_weight": "log",
        "interleaved_n_text": 6,
        "interleaved_n_audio": 12,
        "preprocessor": {
            "sample_rate": 16000, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": 128, "n_fft": 512, "log": true, "frame_splicing": 1,
            "dither": 1e-05, "pad_to": 0, "pad_value": 0.0
        },
        "encoder": {
            "feat_in": 128, "feat_out": -1, "n_layers": d.enc_layers, "d_model": d.enc_d,
            "subsampling": "dw_striding", "subsampling_factor": 8, "subsampling_conv_channels": d.enc_channels,
            "causal_downsampling": false, "reduction": null, "reduction_position": null, "reduction_factor": 1,
            "ff_expansion_factor": 4, "self_attention_model": "rel_pos", "n_heads": d.enc_heads,
            "att_context_size": [-1, -1], "xscaling": false, "untie_biases": true, "pos_emb_max_len": 5000,
            "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "conv_context_size": null,
            "dropout": 0.1, "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1
        },
        "lfm": {
            "model_type": "lfm2", "vocab_size": d.vocab, "hidden_size": d.hidden, "num_hidden_layers": d.layers,
            "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "block_ff_dim": d.ff,
            "block_auto_adjust_ff_dim": true, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
            "full_attn_idxs": d.attn, "rope_theta": 1000000.0, "conv_L_cache": 3, "conv_bias": false,
            "norm_eps": 1e-05, "max_position_embeddings": 128000, "tie_embedding": true,
            "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0
        },
        "depthformer": {"layers": d.depth_layers, "dim": d.depth_dim, "tie": false}
    })
}

fn detokenizer_config(d: &Dims) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Lfm25AudioTokenizer"],
        "model_type": "lfm2",
        "hidden_size": d.det_hidden,
        "num_hidden_layers": d.det_layers.len(),
        "layer_types": d.det_layers,
        "num_attention_heads": d.det_heads,
        "num_key_value_heads": d.det_kv,
        "intermediate_size": d.det_ff,
        "block_auto_adjust_ff_dim": true,
        "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 256,
        "conv_L_cache": 3,
        "conv_bias": false,
        "norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": 30,
        "output_size": 1282,
        "vocab_size": d.vocab,
        "max_position_embeddings": 128000,
        "dtype": "bfloat16"
    })
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut SmallRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-7);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// Writes a safetensors file tensor by tensor (bf16 for floats), never holding the whole model.
fn write_safetensors(path: &Path, entries: &[Entry], rng: &mut SmallRng) -> anyhow::Result<u64> {
    let is_int = |e: &Entry| matches!(e.init, Init::Offsets | Init::ZeroI64);
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for e in entries {
        let n: usize = e.shape.iter().product();
        let bytes = (n * if is_int(e) { 8 } else { 2 }) as u64;
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": if is_int(e) {"I64"} else {"BF16"}, "shape": e.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&serde_json::Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(text.as_bytes())?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    for e in entries {
        let n: usize = e.shape.iter().product();
        for i in 0..n {
            match e.init {
                Init::Offsets => buf.extend_from_slice(&((i * 2049) as i64).to_le_bytes()),
                Init::ZeroI64 => buf.extend_from_slice(&0i64.to_le_bytes()),
                init => {
                    let v = match init {
                        Init::Normal(std) => normal(rng) * std,
                        Init::Const(c) => c,
                        Init::Hann => {
                            0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / n as f32).cos()
                        }
                        _ => unreachable!("integer inits handled above"),
                    };
                    buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            }
            if buf.len() >= 1 << 20 {
                out.write_all(&buf)?;
                buf.clear();
            }
        }
    }
    out.write_all(&buf)?;
    out.flush()?;
    Ok(offset + 8 + text.len() as u64)
}

fn find_tokenizer(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        anyhow::ensure!(p.is_file(), "{}: no such tokenizer file", p.display());
        return Ok(p.to_owned());
    }
    let candidates = [
        PathBuf::from("assets/lfm2-tokenizer.json"),
        crate::cmd::exe_dir().join("../../assets/lfm2-tokenizer.json"),
    ];
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "the LFM2 tokenizer is not in assets/lfm2-tokenizer.json: run `python3 tools/reference/fetch_tokenizer.py` (part of tools/setup.sh) or pass --tokenizer FILE"
        )
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let d = Dims::of(args.size);
    let tokenizer = find_tokenizer(args.tokenizer.as_deref())?;
    let det_dir = args.out.join("audio_detokenizer");
    std::fs::create_dir_all(&det_dir).with_context(|| format!("creating {}", det_dir.display()))?;
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let start = std::time::Instant::now();

    std::fs::write(
        args.out.join("config.json"),
        serde_json::to_string_pretty(&model_config(&d))?,
    )?;
    std::fs::copy(&tokenizer, args.out.join("tokenizer.json"))
        .with_context(|| format!("copying {}", tokenizer.display()))?;
    let entries = model_entries(&d);
    let params: usize = entries
        .iter()
        .map(|e| e.shape.iter().product::<usize>())
        .sum();
    eprintln!(
        "writing {} ({:.1} M parameters)",
        args.out.join("model.safetensors").display(),
        params as f64 / 1e6
    );
    let bytes = write_safetensors(&args.out.join("model.safetensors"), &entries, &mut rng)?;

    std::fs::write(
        det_dir.join("config.json"),
        serde_json::to_string_pretty(&detokenizer_config(&d))?,
    )?;
    let det = detokenizer_entries(&d);
    let det_bytes = write_safetensors(&det_dir.join("model.safetensors"), &det, &mut rng)?;
    eprintln!(
        "wrote {} in {:.1} s: model.safetensors {:.2} GB, audio_detokenizer {:.0} MB",
        args.out.display(),
        start.elapsed().as_secs_f64(),
        bytes as f64 / 1e9,
        det_bytes as f64 / 1e6
    );
    Ok(())
}
