//! Mimi hyperparameters: Kyutai's Mimi v0.1 (the checkpoint shipped with LFM2-Audio), or a
//! `mimi_config.json` next to the weights.
//!
//! `mimi_config.json` holds the keyword dictionaries of the reference's loader (`seanet_kwargs`,
//! `quantizer_kwargs`, `transformer_kwargs`, `mimi_model_kwargs`) under the reference's own names,
//! plus `num_codebooks`. Keys it leaves out keep their v0.1 value; unknown keys are ignored. Only
//! the decode path is configured here: the encoder's settings are not read.

use std::path::Path;

use lfm2_audio::format::{AUDIO_CODES, CODEBOOKS, OUTPUT_SAMPLE_RATE, SAMPLES_PER_FRAME};
use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// File name of the optional configuration, in the directory of the Mimi weights.
pub const CONFIG_FILE: &str = "mimi_config.json";

/// The SEANet decoder (`seanet_kwargs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SeanetConfig {
    pub channels: usize,
    /// Latent width (`dimension`), the decoder's input channels.
    pub dimension: usize,
    pub n_filters: usize,
    pub n_residual_layers: usize,
    /// Upsampling ratios in decoder order.
    pub ratios: Vec<usize>,
    pub kernel_size: usize,
    pub residual_kernel_size: usize,
    pub last_kernel_size: usize,
    pub dilation_base: usize,
    pub compress: usize,
    pub true_skip: bool,
    pub causal: bool,
    pub activation: String,
    pub norm: String,
    pub pad_mode: String,
    pub trim_right_ratio: f64,
    pub final_activation: Option<String>,
}

impl Default for SeanetConfig {
    /// `_seanet_kwargs` of the reference loader (Mimi v0.1).
    fn default() -> Self {
        Self {
            channels: 1,
            dimension: 512,
            n_filters: 64,
            n_residual_layers: 1,
            ratios: vec![8, 6, 5, 4],
            kernel_size: 7,
            residual_kernel_size: 3,
            last_kernel_size: 3,
            dilation_base: 2,
            compress: 2,
            true_skip: true,
            causal: true,
            activation: "ELU".into(),
            norm: "none".into(),
            pad_mode: "constant".into(),
            trim_right_ratio: 1.0,
            final_activation: None,
        }
    }
}

/// The split residual vector quantizer (`quantizer_kwargs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct QuantizerConfig {
    /// Codebook vector width.
    pub dimension: usize,
    /// Codebooks in the checkpoint (1 semantic + `n_q − 1` acoustic).
    pub n_q: usize,
    pub bins: usize,
    pub input_dimension: Option<usize>,
    pub output_dimension: Option<usize>,
}

impl Default for QuantizerConfig {
    /// `_quantizer_kwargs` of the reference loader (Mimi v0.1).
    fn default() -> Self {
        Self {
            dimension: 256,
            n_q: 32,
            bins: 2048,
            input_dimension: Some(512),
            output_dimension: Some(512),
        }
    }
}

/// The decoder transformer (`transformer_kwargs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    pub d_model: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub causal: bool,
    /// Initial LayerScale value; `None` means no LayerScale (and no `layer_scale_*` tensors).
    pub layer_scale: Option<f64>,
    /// Attention span in steps (25 Hz), the current step included.
    pub context: usize,
    pub conv_layout: bool,
    /// RoPE maximum period.
    pub max_period: f64,
    pub gating: String,
    pub norm: String,
    pub positional_embedding: String,
    pub dim_feedforward: usize,
    pub input_dimension: usize,
    pub output_dimensions: Vec<usize>,
}

impl Default for TransformerConfig {
    /// `_transformer_kwargs` of the reference loader (Mimi v0.1).
    fn default() -> Self {
        Self {
            d_model: 512,
            num_heads: 8,
            num_layers: 8,
            causal: true,
            layer_scale: Some(0.01),
            context: 250,
            conv_layout: true,
            max_period: 10000.0,
            gating: "none".into(),
            norm: "layer_norm".into(),
            positional_embedding: "rope".into(),
            dim_feedforward: 2048,
            input_dimension: 512,
            output_dimensions: vec![512],
        }
    }
}

/// Arguments of `MimiModel` (`mimi_model_kwargs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    pub channels: usize,
    pub sample_rate: f64,
    /// Code frame rate (12.5 Hz).
    pub frame_rate: f64,
    /// Rate of the transformer and SEANet latents (25 Hz).
    pub encoder_frame_rate: f64,
    pub causal: bool,
    pub resample_method: String,
    /// `true` makes the ×2 upsampling depthwise, as in the released checkpoint.
    pub upsample_channel_wise_bug: bool,
}

impl Default for ModelConfig {
    /// What the reference's `get_mimi` passes to `MimiModel`.
    fn default() -> Self {
        Self {
            channels: 1,
            sample_rate: 24000.0,
            frame_rate: 12.5,
            encoder_frame_rate: 25.0,
            causal: true,
            resample_method: "conv".into(),
            upsample_channel_wise_bug: true,
        }
    }
}

/// Everything the Mimi decode path needs.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default)]
pub struct MimiConfig {
    #[serde(rename = "seanet_kwargs")]
    pub seanet: SeanetConfig,
    #[serde(rename = "quantizer_kwargs")]
    pub quantizer: QuantizerConfig,
    #[serde(rename = "transformer_kwargs")]
    pub transformer: TransformerConfig,
    #[serde(rename = "mimi_model_kwargs")]
    pub model: ModelConfig,
    /// Active codebooks (`set_num_codebooks`); LFM2-Audio uses 8.
    #[serde(default = "default_codebooks")]
    pub num_codebooks: usize,
}

fn default_codebooks() -> usize {
    CODEBOOKS
}

impl MimiConfig {
    /// Kyutai's Mimi v0.1 with 8 active codebooks, as LFM2-Audio loads it.
    pub fn v0_1() -> Self {
        Self {
            num_codebooks: CODEBOOKS,
            ..Self::default()
        }
    }

    /// Reads and validates a `mimi_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = lfm2_audio::config::read_config_text(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| config_err(path, "<root>", format!("invalid JSON: {e}")))?;
        let cfg: Self = serde_json::from_value(value)
            .map_err(|e| config_err(path, "<root>", format!("unexpected value: {e}")))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Latent width between the quantizer, the transformer and the SEANet decoder.
    pub fn dimension(&self) -> usize {
        self.seanet.dimension
    }

    /// Transformer steps per code frame (the ×2 upsampling stride).
    pub fn upsample_stride(&self) -> usize {
        (self.model.encoder_frame_rate / self.model.frame_rate).round() as usize
    }

    /// Checks that the configuration describes a model this decoder reproduces: causal, 8
    /// codebooks, 24 kHz, 1920 samples per frame, and only the options the released checkpoint
    /// uses. `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let check = |ok: bool, key: &str, message: String| {
            if ok {
                Ok(())
            } else {
                Err(config_err(path, key, message))
            }
        };
        let s = &self.seanet;
        let q = &self.quantizer;
        let t = &self.transformer;
        let m = &self.model;
        // Sizes are bounded before anything is allocated by them (far above the released
        // checkpoint: dimension 512, 32 filters, 8 layers, 2048 feed-forward, context 250).
        for (key, value, max) in [
            ("seanet_kwargs.dimension", s.dimension, 1 << 14),
            ("seanet_kwargs.n_filters", s.n_filters, 1 << 12),
            ("seanet_kwargs.n_residual_layers", s.n_residual_layers, 64),
            ("seanet_kwargs.kernel_size", s.kernel_size, 1024),
            (
                "seanet_kwargs.residual_kernel_size",
                s.residual_kernel_size,
                1024,
            ),
            ("seanet_kwargs.last_kernel_size", s.last_kernel_size, 1024),
            ("seanet_kwargs.dilation_base", s.dilation_base, 64),
            ("seanet_kwargs.compress", s.compress, 64),
            ("quantizer_kwargs.dimension", q.dimension, 1 << 14),
            ("quantizer_kwargs.n_q", q.n_q, 64),
            ("transformer_kwargs.d_model", t.d_model, 1 << 14),
            ("transformer_kwargs.num_heads", t.num_heads, 1024),
            ("transformer_kwargs.num_layers", t.num_layers, 256),
            ("transformer_kwargs.context", t.context, 1 << 20),
            (
                "transformer_kwargs.dim_feedforward",
                t.dim_feedforward,
                1 << 18,
            ),
        ] {
            check(
                value <= max,
                key,
                format!("{value} is out of range (at most {max})"),
            )?;
        }
        check(
            s.ratios.iter().all(|&r| r <= 1 << 12),
            "seanet_kwargs.ratios",
            format!("each ratio must be at most {}", 1 << 12),
        )?;
        check(
            self.num_codebooks == CODEBOOKS,
            "num_codebooks",
            format!("expected {CODEBOOKS}, got {}", self.num_codebooks),
        )?;
        check(
            s.causal && m.causal && t.causal,
            "seanet_kwargs.causal",
            "only causal (streaming) Mimi is supported".into(),
        )?;
        check(
            s.norm == "none",
            "seanet_kwargs.norm",
            format!(
                "expected \"none\" (weights stored without weight norm), got {:?}",
                s.norm
            ),
        )?;
        check(
            s.pad_mode == "constant",
            "seanet_kwargs.pad_mode",
            format!("expected \"constant\", got {:?}", s.pad_mode),
        )?;
        check(
            s.activation == "ELU",
            "seanet_kwargs.activation",
            format!("expected \"ELU\", got {:?}", s.activation),
        )?;
        check(
            s.final_activation.is_none(),
            "seanet_kwargs.final_activation",
            "expected null".into(),
        )?;
        check(
            s.trim_right_ratio == 1.0,
            "seanet_kwargs.trim_right_ratio",
            "expected 1.0".into(),
        )?;
        check(
            s.channels == 1 && m.channels == 1,
            "seanet_kwargs.channels",
            "expected mono (1)".into(),
        )?;
        check(
            s.dimension > 0 && s.n_filters > 0 && s.compress > 0,
            "seanet_kwargs.dimension",
            "dimension, n_filters and compress must be positive".into(),
        )?;
        check(
            !s.ratios.is_empty() && s.ratios.len() <= 8 && s.ratios.iter().all(|&r| r > 0),
            "seanet_kwargs.ratios",
            "must be a list of 1 to 8 positive ratios".into(),
        )?;
        check(
            s.kernel_size > 0
                && s.residual_kernel_size > 0
                && s.last_kernel_size > 0
                && s.dilation_base > 0,
            "seanet_kwargs.kernel_size",
            "kernel sizes and dilation base must be positive".into(),
        )?;
        check(
            s.n_filters.checked_mul(1 << s.ratios.len()).is_some(),
            "seanet_kwargs.n_filters",
            "too large".into(),
        )?;

        check(
            q.n_q > CODEBOOKS,
            "quantizer_kwargs.n_q",
            format!("must exceed {CODEBOOKS} (1 semantic + acoustic codebooks)"),
        )?;
        check(
            q.bins == AUDIO_CODES as usize,
            "quantizer_kwargs.bins",
            format!("expected {}, got {}", AUDIO_CODES, q.bins),
        )?;
        check(
            q.dimension > 0,
            "quantizer_kwargs.dimension",
            "must be positive".into(),
        )?;
        check(
            q.output_dimension.unwrap_or(q.dimension) == s.dimension,
            "quantizer_kwargs.output_dimension",
            format!("must equal seanet_kwargs.dimension {}", s.dimension),
        )?;

        check(
            t.d_model > 0
                && t.num_heads > 0
                && t.d_model.is_multiple_of(t.num_heads)
                && (t.d_model / t.num_heads).is_multiple_of(2),
            "transformer_kwargs.num_heads",
            format!("must divide d_model {} into heads of even width", t.d_model),
        )?;
        check(
            t.context > 0,
            "transformer_kwargs.context",
            "must be positive".into(),
        )?;
        check(
            t.conv_layout,
            "transformer_kwargs.conv_layout",
            "expected true".into(),
        )?;
        check(
            t.gating == "none",
            "transformer_kwargs.gating",
            format!("expected \"none\", got {:?}", t.gating),
        )?;
        check(
            t.norm == "layer_norm",
            "transformer_kwargs.norm",
            format!("expected \"layer_norm\", got {:?}", t.norm),
        )?;
        check(
            t.positional_embedding == "rope",
            "transformer_kwargs.positional_embedding",
            format!("expected \"rope\", got {:?}", t.positional_embedding),
        )?;
        check(
            t.max_period > 0.0,
            "transformer_kwargs.max_period",
            "must be positive".into(),
        )?;
        check(
            t.dim_feedforward > 0,
            "transformer_kwargs.dim_feedforward",
            "must be positive".into(),
        )?;
        check(
            t.input_dimension == s.dimension && t.output_dimensions == [s.dimension],
            "transformer_kwargs.output_dimensions",
            format!(
                "input and the single output must equal seanet_kwargs.dimension {}",
                s.dimension
            ),
        )?;

        check(
            m.resample_method == "conv",
            "mimi_model_kwargs.resample_method",
            format!("expected \"conv\", got {:?}", m.resample_method),
        )?;
        check(
            m.sample_rate == OUTPUT_SAMPLE_RATE as f64,
            "mimi_model_kwargs.sample_rate",
            format!("expected {OUTPUT_SAMPLE_RATE}"),
        )?;
        check(
            m.frame_rate > 0.0 && m.encoder_frame_rate > m.frame_rate,
            "mimi_model_kwargs.encoder_frame_rate",
            "must exceed frame_rate".into(),
        )?;
        let stride = m.encoder_frame_rate / m.frame_rate;
        check(
            stride.fract() == 0.0,
            "mimi_model_kwargs.encoder_frame_rate",
            "must be an integer multiple of frame_rate".into(),
        )?;
        let hop = s
            .ratios
            .iter()
            .try_fold(1usize, |a, &r| a.checked_mul(r))
            .unwrap_or(0);
        check(
            hop > 0 && m.sample_rate / hop as f64 == m.encoder_frame_rate,
            "seanet_kwargs.ratios",
            format!(
                "their product must turn {} Hz into {} Hz",
                m.encoder_frame_rate, m.sample_rate
            ),
        )?;
        check(
            hop.checked_mul(self.upsample_stride()) == Some(SAMPLES_PER_FRAME)
                && m.sample_rate / m.frame_rate == SAMPLES_PER_FRAME as f64,
            "mimi_model_kwargs.frame_rate",
            format!("a code frame must give {SAMPLES_PER_FRAME} samples"),
        )?;
        Ok(())
    }
}

fn config_err(path: &Path, key: &str, message: String) -> Error {
    Error::Config {
        path: path.to_owned(),
        key: key.into(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v0_1_is_valid_and_gives_1920_samples_per_frame() {
        let cfg = MimiConfig::v0_1();
        cfg.validate(Path::new("v0.1")).unwrap();
        assert_eq!(cfg.upsample_stride(), 2);
        assert_eq!(cfg.seanet.ratios.iter().product::<usize>() * 2, 1920);
    }

    #[test]
    fn partial_files_keep_v0_1_values_and_bad_values_are_named() {
        let cfg: MimiConfig =
            serde_json::from_str(r#"{"transformer_kwargs": {"context": 8}, "x": 1}"#).unwrap();
        assert_eq!(cfg.transformer.context, 8);
        assert_eq!(cfg.transformer.d_model, 512);
        assert_eq!(cfg.num_codebooks, 8);
        let mut bad = cfg.clone();
        bad.transformer.gating = "silu".into();
        let err = bad.validate(Path::new("m.json")).unwrap_err().to_string();
        assert!(err.contains("transformer_kwargs.gating"), "{err}");
        let mut bad = cfg;
        bad.seanet.ratios = vec![8, 6, 5];
        assert!(bad.validate(Path::new("m.json")).is_err());
    }
}
