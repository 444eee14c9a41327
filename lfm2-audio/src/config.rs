//! Model configuration read from a checkpoint's `config.json`.
//!
//! The LFM2 section exists in two spellings: the original one (`block_ff_dim`, `full_attn_idxs`,
//! `rope_theta`, `tie_embedding`) and the newer Hugging Face one (`intermediate_size`,
//! `layer_types`, `rope_parameters.rope_theta`, `tie_word_embeddings`). Both are accepted, with
//! the defaults of Hugging Face's `Lfm2Config`. Every value is validated and an error names the
//! offending key by its dotted path.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The kind of operator of one LFM2 layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Gated short convolution (`conv`).
    Conv,
    /// Grouped-query attention (`full_attention`, or `sliding_attention` with a window).
    Attention,
}

/// Configuration of a generic LFM2 stack: the backbone of LFM2-Audio, and the LFM2 audio
/// detokenizer of LFM2.5-Audio.
#[derive(Debug, Clone, PartialEq)]
pub struct Lfm2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Effective feed-forward width after the auto-adjust rule.
    pub ff_dim: usize,
    pub layer_types: Vec<LayerKind>,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Width of one attention head (`head_dim`, or hidden / heads).
    pub head_dim: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    /// Kernel size of the causal short convolution (`conv_L_cache`).
    pub conv_kernel: usize,
    pub conv_bias: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Attention window in positions, the current one included; `None` is full causal attention.
    pub sliding_window: Option<usize>,
}

impl Lfm2Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn num_layers(&self) -> usize {
        self.layer_types.len()
    }

    /// The feed-forward width rule of `Lfm2MLP`: with auto-adjust, ff = int(2·ff/3), then, when a
    /// multiplier is set, ff = multiple_of · ceil(int(multiplier · ff) / multiple_of).
    pub fn adjusted_ff_dim(
        ff: usize,
        auto_adjust: bool,
        multiplier: Option<f64>,
        multiple_of: usize,
    ) -> usize {
        if !auto_adjust {
            return ff;
        }
        let ff = (2 * ff) / 3;
        match multiplier {
            None => ff,
            Some(m) => multiple_of * ((m * ff as f64) as usize).div_ceil(multiple_of),
        }
    }

    /// Reads an LFM2 configuration from a JSON object; `prefix` is the dotted path of the object
    /// within the file (e.g. `lfm`), used in error messages.
    pub fn from_json(obj: &Map<String, Value>, path: &Path, prefix: &str) -> Result<Self> {
        let r = Reader { obj, path, prefix };
        let hidden_size = r.usize_or("hidden_size", 2560)?;
        let num_hidden_layers = r.usize_or("num_hidden_layers", 32)?;
        let num_attention_heads = r.usize_or("num_attention_heads", 32)?;
        let num_key_value_heads = r.usize_or("num_key_value_heads", 8)?;
        let vocab_size = r.usize_or("vocab_size", 65536)?;
        r.check(hidden_size > 0, "hidden_size", "must be positive")?;
        r.check(vocab_size > 0, "vocab_size", "must be positive")?;
        r.check(
            num_hidden_layers > 0,
            "num_hidden_layers",
            "must be positive",
        )?;
        r.check(
            num_attention_heads > 0,
            "num_attention_heads",
            "must be positive",
        )?;
        let head_dim = if r.has("head_dim") {
            r.usize_req("head_dim")?
        } else {
            r.check(
                hidden_size % num_attention_heads == 0,
                "num_attention_heads",
                &format!("must divide hidden_size {hidden_size}"),
            )?;
            hidden_size / num_attention_heads
        };
        r.check(
            num_key_value_heads > 0 && num_attention_heads % num_key_value_heads == 0,
            "num_key_value_heads",
            &format!("must be positive and divide num_attention_heads {num_attention_heads}"),
        )?;
        let head_key = if r.has("head_dim") {
            "head_dim"
        } else {
            "num_attention_heads"
        };
        r.check(
            head_dim > 0 && head_dim % 2 == 0,
            head_key,
            "head dimension must be even and positive (rotary embeddings)",
        )?;

        // `block_ff_dim` is the original spelling of `intermediate_size` and wins when present.
        let ff_key = if r.has("block_ff_dim") {
            "block_ff_dim"
        } else {
            "intermediate_size"
        };
        let ff = r.usize_or(ff_key, 12288)?;
        r.check(ff > 0, ff_key, "must be positive")?;
        let auto_adjust = r.bool_or("block_auto_adjust_ff_dim", true)?;
        let multiplier = match obj.get("block_ffn_dim_multiplier") {
            Some(Value::Null) => None,
            _ => Some(r.f64_or("block_ffn_dim_multiplier", 1.0)?),
        };
        r.check(
            multiplier.is_none_or(|m| m > 0.0),
            "block_ffn_dim_multiplier",
            "must be positive",
        )?;
        let multiple_of = r.usize_or("block_multiple_of", 256)?;
        r.check(multiple_of > 0, "block_multiple_of", "must be positive")?;
        let ff_dim = Self::adjusted_ff_dim(ff, auto_adjust, multiplier, multiple_of);
        r.check(
            ff_dim > 0,
            ff_key,
            "gives an empty feed-forward after auto-adjust",
        )?;

        let layer_types = if r.has("layer_types") {
            let list = r.array("layer_types")?;
            r.check(
                list.len() == num_hidden_layers,
                "layer_types",
                &format!(
                    "has {} entries, num_hidden_layers is {num_hidden_layers}",
                    list.len()
                ),
            )?;
            list.iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some("conv") => Ok(LayerKind::Conv),
                    Some("full_attention") | Some("sliding_attention") => Ok(LayerKind::Attention),
                    _ => Err(r.err(
                        &format!("layer_types[{i}]"),
                        &format!("expected \"conv\", \"full_attention\" or \"sliding_attention\", got {v}"),
                    )),
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            // Hugging Face's default when neither key is given: every layer is attention.
            let idxs = if r.has("full_attn_idxs") {
                let list = r.array("full_attn_idxs")?;
                r.check(
                    list.len() <= num_hidden_layers,
                    "full_attn_idxs",
                    &format!(
                        "has {} entries, more than num_hidden_layers {num_hidden_layers}",
                        list.len()
                    ),
                )?;
                list.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_u64()
                            .map(|x| x as usize)
                            .filter(|&x| x < num_hidden_layers)
                            .ok_or_else(|| {
                                r.err(
                                    &format!("full_attn_idxs[{i}]"),
                                    &format!(
                                        "expected a layer index below {num_hidden_layers}, got {v}"
                                    ),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>>>()?
            } else {
                (0..num_hidden_layers).collect()
            };
            let mut layers = vec![LayerKind::Conv; num_hidden_layers];
            for i in idxs {
                layers[i] = LayerKind::Attention;
            }
            layers
        };

        let rope_theta = match obj.get("rope_parameters") {
            Some(Value::Object(params)) => {
                let sub = Reader {
                    obj: params,
                    path,
                    prefix: &r.key("rope_parameters"),
                };
                if let Some(kind) = params.get("rope_type") {
                    sub.check(
                        kind.as_str() == Some("default"),
                        "rope_type",
                        &format!("only the \"default\" rotary embedding is supported, got {kind}"),
                    )?;
                }
                let theta = sub.f64_or("rope_theta", 1e6)?;
                sub.check(theta > 0.0, "rope_theta", "must be positive")?;
                theta
            }
            Some(Value::Null) | None => {
                let theta = r.f64_or("rope_theta", 1e6)?;
                r.check(theta > 0.0, "rope_theta", "must be positive")?;
                theta
            }
            Some(other) => {
                return Err(r.err(
                    "rope_parameters",
                    &format!("expected an object, got {other}"),
                ))
            }
        };
        let norm_eps = r.f64_or("norm_eps", 1e-5)?;
        r.check(
            norm_eps > 0.0 && norm_eps < 1.0,
            "norm_eps",
            "must be in (0, 1)",
        )?;
        let conv_kernel = r.usize_or("conv_L_cache", 3)?;
        r.check(conv_kernel >= 1, "conv_L_cache", "must be at least 1")?;
        let conv_bias = r.bool_or("conv_bias", false)?;
        let max_position_embeddings = r.usize_or("max_position_embeddings", 128000)?;
        r.check(
            max_position_embeddings > 0,
            "max_position_embeddings",
            "must be positive",
        )?;
        let tie_key = if r.has("tie_embedding") {
            "tie_embedding"
        } else {
            "tie_word_embeddings"
        };
        let tie_word_embeddings = r.bool_or(tie_key, true)?;
        let sliding_window = match obj.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(_) => {
                let w = r.usize_or("sliding_window", 0)?;
                r.check(w > 0, "sliding_window", "must be positive")?;
                Some(w)
            }
        };
        Ok(Self {
            vocab_size,
            hidden_size,
            ff_dim,
            layer_types,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta,
            norm_eps,
            conv_kernel,
            conv_bias,
            max_position_embeddings,
            tie_word_embeddings,
            sliding_window,
        })
    }
}

/// Configuration of the depth transformer that emits the 8 codebooks of an audio frame.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthformerConfig {
    pub layers: usize,
    pub dim: usize,
    pub tie: bool,
}

/// The top-level `config.json` of an LFM2-Audio checkpoint.
#[derive(Debug, Clone)]
pub struct Lfm2AudioConfig {
    pub lfm: Lfm2Config,
    pub depthformer: DepthformerConfig,
    pub codebooks: usize,
    pub interleaved_n_text: usize,
    pub interleaved_n_audio: usize,
    pub tie_audio_embeddings: bool,
    /// The `preprocessor` section, kept as read for the audio front-end.
    pub preprocessor: Map<String, Value>,
    /// The `encoder` section, kept as read for the conformer.
    pub encoder: Map<String, Value>,
    /// Where the configuration was read from.
    pub path: PathBuf,
}

impl Lfm2AudioConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_config_text(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile {
                path: path.to_owned(),
                what: "model configuration",
            },
            _ => Error::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        Self::from_str(&text, path)
    }

    /// Parses a configuration from JSON text; `path` is only used in messages.
    pub fn from_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_owned(),
            key: "<root>".into(),
            message: format!("invalid JSON: {e}"),
        })?;
        let Value::Object(root) = value else {
            return Err(Error::Config {
                path: path.to_owned(),
                key: "<root>".into(),
                message: "expected a JSON object".into(),
            });
        };
        let r = Reader {
            obj: &root,
            path,
            prefix: "",
        };
        let lfm = Lfm2Config::from_json(r.object("lfm")?, path, "lfm")?;
        let d = Reader {
            obj: r.object("depthformer")?,
            path,
            prefix: "depthformer",
        };
        let depthformer = DepthformerConfig {
            layers: d.usize_req("layers")?,
            dim: d.usize_req("dim")?,
            tie: d.bool_or("tie", false)?,
        };
        d.check(depthformer.layers > 0, "layers", "must be positive")?;
        d.check(
            depthformer.dim > 0 && depthformer.dim.is_multiple_of(32),
            "dim",
            "must be a positive multiple of 32 (32 heads)",
        )?;
        let codebooks = r.usize_or("codebooks", 8)?;
        r.check(
            codebooks == crate::format::CODEBOOKS,
            "codebooks",
            "must be 8 (the codecs decode frames of 8 codes)",
        )?;
        let interleaved_n_text = r.usize_or("interleaved_n_text", 6)?;
        let interleaved_n_audio = r.usize_or("interleaved_n_audio", 12)?;
        r.check(
            interleaved_n_text > 0,
            "interleaved_n_text",
            "must be positive",
        )?;
        r.check(
            interleaved_n_audio > 0,
            "interleaved_n_audio",
            "must be positive",
        )?;
        let tie_audio_embeddings = r.bool_or("tie_audio_embeddings", false)?;
        Ok(Self {
            lfm,
            depthformer,
            codebooks,
            interleaved_n_text,
            interleaved_n_audio,
            tie_audio_embeddings,
            preprocessor: r.object("preprocessor")?.clone(),
            encoder: r.object("encoder")?.clone(),
            path: path.to_owned(),
        })
    }
}

/// Largest `config.json` read (real ones are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The largest value accepted for an integer key of a configuration, before anything is sized by
/// it. The limits are far above every released model (documented in the README) and low enough
/// that no product of them overflows or asks for an absurd allocation before the weights are
/// checked against them.
pub fn max_of(key: &str) -> usize {
    match key {
        // Layer counts.
        "num_hidden_layers" | "layers" | "n_layers" | "num_layers" | "num_blocks" => 256,
        // Widths.
        "hidden_size"
        | "dim"
        | "d_model"
        | "head_dim"
        | "subsampling_conv_channels"
        | "feat_in"
        | "features" => 1 << 16,
        "intermediate_size" | "block_ff_dim" | "ff_dim" => 1 << 18,
        "num_attention_heads" | "num_key_value_heads" | "n_heads" | "num_heads" => 1024,
        "vocab_size" | "codebook_size" | "audio_vocab_size" => 1 << 22,
        "codebooks" | "num_codebooks" | "n_q" => 64,
        "max_position_embeddings" | "context" | "sliding_window" | "pos_emb_max_len" => 1 << 24,
        // The mel front-end: an FFT of at most 2^16 points, padding to at most 2^12 frames.
        "n_fft" => 1 << 16,
        "pad_to" => 1 << 12,
        "sample_rate" => 384_000,
        "conv_L_cache" | "conv_kernel_size" | "kernel_size" => 1024,
        _ => 1 << 20,
    }
}

/// Reads a configuration file, refusing one over [`MAX_CONFIG_BYTES`] before reading it.
pub fn read_config_text(path: &Path) -> std::io::Result<String> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{len} bytes is too large for a configuration (at most {MAX_CONFIG_BYTES})"),
        ));
    }
    std::fs::read_to_string(path)
}

/// Typed access to one JSON object with errors that name the key's dotted path.
pub(crate) struct Reader<'a> {
    pub obj: &'a Map<String, Value>,
    pub path: &'a Path,
    pub prefix: &'a str,
}

impl Reader<'_> {
    pub fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    pub fn err(&self, key: &str, message: &str) -> Error {
        Error::Config {
            path: self.path.to_owned(),
            key: self.key(key),
            message: message.to_owned(),
        }
    }

    pub fn check(&self, ok: bool, key: &str, message: &str) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(self.err(key, message))
        }
    }

    pub fn has(&self, key: &str) -> bool {
        !matches!(self.obj.get(key), None | Some(Value::Null))
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn object(&self, key: &str) -> Result<&Map<String, Value>> {
        match self.present(key) {
            Some(Value::Object(m)) => Ok(m),
            Some(other) => Err(self.err(key, &format!("expected an object, got {other}"))),
            None => Err(self.err(key, "missing")),
        }
    }

    pub fn array(&self, key: &str) -> Result<&Vec<Value>> {
        match self.present(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(self.err(key, &format!("expected a list, got {other}"))),
            None => Err(self.err(key, "missing")),
        }
    }

    pub fn usize_req(&self, key: &str) -> Result<usize> {
        match self.present(key) {
            None => Err(self.err(key, "missing")),
            Some(v) => self.to_usize(key, v),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => self.to_usize(key, v),
        }
    }

    fn to_usize(&self, key: &str, v: &Value) -> Result<usize> {
        // Integral floats (e.g. 512.0) are accepted, as Python writes them that way at times; only
        // up to 2^53, where they are still exact (a cast would saturate larger ones).
        let n = v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f <= 9_007_199_254_740_992.0)
                .map(|f| f as u64)
        });
        let n = n
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, &format!("expected a non-negative integer, got {v}")))?;
        let max = max_of(key);
        if n > max {
            return Err(self.err(key, &format!("{n} is out of range (at most {max})")));
        }
        Ok(n)
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| self.err(key, &format!("expected a finite number, got {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, &format!("expected true or false, got {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lfm(json: &str) -> Result<Lfm2Config> {
        let v: Value = serde_json::from_str(json).unwrap();
        Lfm2Config::from_json(v.as_object().unwrap(), Path::new("config.json"), "lfm")
    }

    #[test]
    fn ff_auto_adjust_matches_known_models() {
        // LFM2-1.2B backbone: 12288 -> 8192; LFM2.5 detokenizer: 3328 -> 2304; depthformer 4096 -> 2816.
        assert_eq!(
            Lfm2Config::adjusted_ff_dim(12288, true, Some(1.0), 256),
            8192
        );
        assert_eq!(
            Lfm2Config::adjusted_ff_dim(3328, true, Some(1.0), 256),
            2304
        );
        assert_eq!(
            Lfm2Config::adjusted_ff_dim(4096, true, Some(1.0), 256),
            2816
        );
        assert_eq!(
            Lfm2Config::adjusted_ff_dim(1000, false, Some(1.0), 256),
            1000
        );
        // A null multiplier skips the rounding.
        assert_eq!(Lfm2Config::adjusted_ff_dim(1000, true, None, 256), 666);
    }

    #[test]
    fn both_spellings_give_the_same_config() {
        let old = lfm(
            r#"{"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "block_ff_dim": 384, "full_attn_idxs": [1, 3],
            "rope_theta": 10000.0, "tie_embedding": true, "vocab_size": 100}"#,
        )
        .unwrap();
        let new = lfm(
            r#"{"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 384,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"],
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": true, "vocab_size": 100}"#,
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old.ff_dim, 256);
        assert_eq!(old.layer_types[1], LayerKind::Attention);
        assert_eq!(old.rope_theta, 10000.0);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                r#"{"hidden_size": 64, "num_attention_heads": 5}"#,
                "lfm.num_attention_heads",
            ),
            (r#"{"hidden_size": "big"}"#, "lfm.hidden_size"),
            (
                r#"{"num_hidden_layers": 2, "layer_types": ["conv"]}"#,
                "lfm.layer_types",
            ),
            (
                r#"{"num_hidden_layers": 2, "layer_types": ["conv", "mamba"]}"#,
                "lfm.layer_types[1]",
            ),
            (
                r#"{"num_hidden_layers": 2, "full_attn_idxs": [2]}"#,
                "lfm.full_attn_idxs[0]",
            ),
            (
                r#"{"rope_parameters": {"rope_theta": -1.0}}"#,
                "lfm.rope_parameters.rope_theta",
            ),
            (
                r#"{"rope_parameters": {"rope_type": "yarn"}}"#,
                "lfm.rope_parameters.rope_type",
            ),
            (r#"{"norm_eps": 0}"#, "lfm.norm_eps"),
            (r#"{"num_key_value_heads": 3}"#, "lfm.num_key_value_heads"),
        ];
        for (json, key) in cases {
            match lfm(json) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key, "for {json}"),
                other => panic!("expected a config error naming {key} for {json}, got {other:?}"),
            }
        }
    }

    #[test]
    fn top_level_errors_name_the_section() {
        let err = Lfm2AudioConfig::from_str(
            r#"{"lfm": {}, "depthformer": {"layers": 2}}"#,
            Path::new("c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`depthformer.dim`: missing"), "{err}");
        let err = Lfm2AudioConfig::from_str("{not json", Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid JSON"), "{err}");
    }
}
