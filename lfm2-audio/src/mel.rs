//! The log-mel front-end of the audio encoder, exactly as the reference's NeMo
//! `AudioToMelSpectrogramPreprocessor` at inference (no dither):
//!
//! 1. pre-emphasis `y[i] = x[i] − 0.97·x[i−1]`;
//! 2. centred STFT (zero padding n_fft/2 each side), symmetric Hann window of `win` samples
//!    centred in `n_fft`, hop `hop`: `1 + ⌊L/hop⌋` frames;
//! 3. power `|X|²`, Slaney mel filterbank (librosa's, f32 weights), `ln(M + 2⁻²⁴)`;
//! 4. per-feature normalisation over the `⌊L/hop⌋` valid frames (std with N−1, then + 1e-5);
//! 5. frames from `⌊L/hop⌋` on are set to `pad_value` (this zeroes the last STFT frame), and the
//!    frame count is padded to a multiple of `pad_to` when that is set.
//!
//! The reference's `ChatState` keeps every frame, the zeroed last one included.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use realfft::{RealFftPlanner, RealToComplex};
use serde_json::{Map, Value};

use crate::config::Reader;
use crate::error::{Error, Result};

/// Pre-emphasis coefficient (NeMo default; not a config field).
const PREEMPH: f64 = 0.97;
/// Added before the log (NeMo `log_zero_guard_value`, 2⁻²⁴).
const LOG_GUARD: f64 = 5.960_464_477_539_063e-8;
/// Added to the per-feature standard deviation (NeMo `CONSTANT`).
const STD_EPS: f64 = 1e-5;

/// The `preprocessor` section of `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    pub sample_rate: u32,
    /// Window length in samples (`int(window_size · sample_rate)`).
    pub win_length: usize,
    /// Hop in samples (`int(window_stride · sample_rate)`).
    pub hop_length: usize,
    pub n_fft: usize,
    pub n_mels: usize,
    pub pad_to: usize,
    pub pad_value: f32,
}

impl PreprocessorConfig {
    /// Reads and validates the section; unsupported settings name their key.
    pub fn from_json(obj: &Map<String, Value>, path: &Path) -> Result<Self> {
        let r = Reader {
            obj,
            path,
            prefix: "preprocessor",
        };
        let sample_rate = r.usize_or("sample_rate", 16000)?;
        r.check(
            sample_rate == 16000,
            "sample_rate",
            "only 16000 is supported (the model's input rate)",
        )?;
        let window_size = r.f64_or("window_size", 0.025)?;
        let window_stride = r.f64_or("window_stride", 0.01)?;
        r.check(
            window_size > 0.0 && window_size <= 1.0,
            "window_size",
            "must be in (0, 1] seconds",
        )?;
        r.check(
            window_stride > 0.0 && window_stride <= 1.0,
            "window_stride",
            "must be in (0, 1] seconds",
        )?;
        let win_length = (window_size * sample_rate as f64) as usize;
        let hop_length = (window_stride * sample_rate as f64) as usize;
        r.check(win_length > 0, "window_size", "gives an empty window")?;
        r.check(hop_length > 0, "window_stride", "gives an empty hop")?;
        let n_fft = match obj.get("n_fft") {
            None | Some(Value::Null) => win_length.next_power_of_two(),
            Some(_) => r.usize_req("n_fft")?,
        };
        r.check(
            n_fft >= win_length,
            "n_fft",
            &format!("must be at least the window length {win_length}"),
        )?;
        let n_mels = r.usize_or("features", 128)?;
        r.check(
            n_mels == 128,
            "features",
            "the model takes 128 mel features",
        )?;
        if let Some(w) = obj.get("window") {
            r.check(
                w.as_str() == Some("hann"),
                "window",
                &format!("only \"hann\" is supported, got {w}"),
            )?;
        }
        if let Some(n) = obj.get("normalize") {
            r.check(
                n.as_str() == Some("per_feature"),
                "normalize",
                &format!("only \"per_feature\" is supported, got {n}"),
            )?;
        }
        r.check(
            r.bool_or("log", true)?,
            "log",
            "only log features are supported",
        )?;
        r.check(
            r.usize_or("frame_splicing", 1)? == 1,
            "frame_splicing",
            "only 1 is supported",
        )?;
        let pad_to = r.usize_or("pad_to", 16)?;
        let pad_value = r.f64_or("pad_value", 0.0)? as f32;
        Ok(Self {
            sample_rate: sample_rate as u32,
            win_length,
            hop_length,
            n_fft,
            n_mels,
            pad_to,
            pad_value,
        })
    }
}

/// Computes log-mel features of 16 kHz audio.
pub struct MelFrontend {
    cfg: PreprocessorConfig,
    /// The Hann window zero-padded to `n_fft`, centred.
    window: Vec<f64>,
    /// `[n_mels][n_fft/2 + 1]` filterbank weights.
    filterbank: Vec<Vec<f32>>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for MelFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelFrontend")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl MelFrontend {
    pub fn new(cfg: &PreprocessorConfig) -> Self {
        // torch.hann_window(win, periodic=False): 0.5 − 0.5·cos(2πi/(win−1)), centred in n_fft.
        let mut window = vec![0.0; cfg.n_fft];
        let left = (cfg.n_fft - cfg.win_length) / 2;
        for i in 0..cfg.win_length {
            let w = if cfg.win_length == 1 {
                1.0
            } else {
                0.5 - 0.5
                    * (2.0 * std::f64::consts::PI * i as f64 / (cfg.win_length - 1) as f64).cos()
            };
            // The reference's window is an f32 tensor.
            window[left + i] = w as f32 as f64;
        }
        let filterbank = slaney_filterbank(
            cfg.sample_rate as f64,
            cfg.n_fft,
            cfg.n_mels,
            0.0,
            cfg.sample_rate as f64 / 2.0,
        );
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(cfg.n_fft);
        Self {
            cfg: cfg.clone(),
            window,
            filterbank,
            fft,
        }
    }

    pub fn config(&self) -> &PreprocessorConfig {
        &self.cfg
    }

    /// Number of mel frames for `len` samples (`1 + ⌊len/hop⌋`, then padded to `pad_to`).
    pub fn frames(&self, len: usize) -> usize {
        let t = 1 + len / self.cfg.hop_length;
        match self.cfg.pad_to {
            0 => t,
            p => t.div_ceil(p) * p,
        }
    }

    /// Features `[n_mels, frames]` of a 16 kHz mono clip.
    pub fn compute(&self, wave: &[f32]) -> Result<Tensor> {
        if let Some(i) = wave.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "audio sample {i} is not a finite number ({})",
                wave[i]
            )));
        }
        let n_fft = self.cfg.n_fft;
        let hop = self.cfg.hop_length;
        let len = wave.len();
        let t_stft = 1 + len / hop;
        let valid = len / hop;
        let bins = n_fft / 2 + 1;

        // Pre-emphasis (the reference computes it in f32), then centre padding.
        let pad = n_fft / 2;
        let mut padded = vec![0f64; len + 2 * pad];
        for i in 0..len {
            let y = if i == 0 {
                wave[0]
            } else {
                wave[i] - (PREEMPH as f32) * wave[i - 1]
            };
            padded[pad + i] = y as f64;
        }

        let mut frame = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f64; bins];
        let mut mel = vec![vec![0f64; t_stft]; self.cfg.n_mels];
        for m in 0..t_stft {
            let start = m * hop;
            for (i, f) in frame.iter_mut().enumerate() {
                let x = padded.get(start + i).copied().unwrap_or(0.0);
                *f = x * self.window[i];
            }
            self.fft
                .process_with_scratch(&mut frame, &mut spectrum, &mut scratch)
                .map_err(|e| Error::Invalid(format!("FFT failed: {e}")))?;
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for (row, weights) in mel.iter_mut().zip(&self.filterbank) {
                let e: f64 = weights
                    .iter()
                    .zip(&power)
                    .map(|(&w, &p)| w as f64 * p)
                    .sum();
                row[m] = (e + LOG_GUARD).ln();
            }
        }

        // Per-feature normalisation over the valid frames; the rest is masked.
        let frames = self.frames(len);
        let mut out = vec![self.cfg.pad_value; self.cfg.n_mels * frames];
        for (k, row) in mel.iter().enumerate() {
            if valid == 0 {
                // The reference's statistics are NaN here and every frame is masked.
                break;
            }
            let mean = row[..valid].iter().sum::<f64>() / valid as f64;
            let var = row[..valid]
                .iter()
                .map(|x| (x - mean) * (x - mean))
                .sum::<f64>()
                / (valid as f64 - 1.0);
            // One valid frame: the reference's std is NaN, replaced by 0.
            let std = if var.is_finite() { var.sqrt() } else { 0.0 } + STD_EPS;
            for t in 0..valid {
                out[k * frames + t] = ((row[t] - mean) / std) as f32;
            }
        }
        Ok(Tensor::from_vec(
            out,
            (self.cfg.n_mels, frames),
            &Device::Cpu,
        )?)
    }
}

/// librosa's `filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm="slaney")`, computed
/// in f64 and stored in f32 as librosa returns it.
fn slaney_filterbank(sr: f64, n_fft: usize, n_mels: usize, fmin: f64, fmax: f64) -> Vec<Vec<f32>> {
    let bins = n_fft / 2 + 1;
    let bin_width = 1.0 / (n_fft as f64 * (1.0 / sr));
    let fft_freqs: Vec<f64> = (0..bins).map(|k| k as f64 * bin_width).collect();
    let (min_mel, max_mel) = (hz_to_mel(fmin), hz_to_mel(fmax));
    // np.linspace(min, max, n_mels + 2), the last point set to max exactly.
    let n = n_mels + 2;
    let step = (max_mel - min_mel) / (n - 1) as f64;
    let mel_f: Vec<f64> = (0..n)
        .map(|i| {
            if i == n - 1 {
                max_mel
            } else {
                i as f64 * step + min_mel
            }
        })
        .map(mel_to_hz)
        .collect();
    (0..n_mels)
        .map(|i| {
            let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
            fft_freqs
                .iter()
                .map(|&f| {
                    let lower = -(mel_f[i] - f) / (mel_f[i + 1] - mel_f[i]);
                    let upper = (mel_f[i + 2] - f) / (mel_f[i + 2] - mel_f[i + 1]);
                    let tri = lower.min(upper).max(0.0) as f32;
                    (tri as f64 * enorm) as f32
                })
                .collect()
        })
        .collect()
}

/// Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
fn hz_to_mel(f: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        f_sp * m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend() -> MelFrontend {
        MelFrontend::new(&PreprocessorConfig {
            sample_rate: 16000,
            win_length: 400,
            hop_length: 160,
            n_fft: 512,
            n_mels: 128,
            pad_to: 0,
            pad_value: 0.0,
        })
    }

    #[test]
    fn frame_count_and_masked_last_frame() {
        let fe = frontend();
        let wave: Vec<f32> = (0..1600).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let mel = fe.compute(&wave).unwrap();
        assert_eq!(mel.dims(), &[128, 11]);
        let last = mel
            .narrow(1, 10, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(last.iter().all(|&x| x == 0.0));
        // Each feature is normalised over the 10 valid frames: mean 0.
        let first = mel
            .narrow(1, 0, 10)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(first.iter().all(|m| m.abs() < 1e-3), "{first:?}");
    }

    #[test]
    fn slaney_filterbank_shape_and_norm() {
        let fb = slaney_filterbank(16000.0, 512, 128, 0.0, 8000.0);
        assert_eq!((fb.len(), fb[0].len()), (128, 257));
        // Non-negative triangles whose peaks move up in frequency; the values themselves are
        // checked through the reference's mel features in the parity tests.
        let peak = |row: &Vec<f32>| {
            row.iter()
                .enumerate()
                .fold(0, |b, (i, &w)| if w > row[b] { i } else { b })
        };
        for pair in fb.windows(2) {
            assert!(pair[0].iter().all(|&w| w >= 0.0));
            assert!(peak(&pair[1]) >= peak(&pair[0]));
        }
        assert!(peak(&fb[127]) > 240);
        assert!((hz_to_mel(8000.0) - 45.245).abs() < 1e-3);
        assert!((mel_to_hz(hz_to_mel(3000.0)) - 3000.0).abs() < 1e-9);
    }

    #[test]
    fn short_and_bad_input() {
        let fe = frontend();
        // Under one hop: no valid frame, everything masked (as the reference).
        let mel = fe.compute(&[0.1; 100]).unwrap();
        assert_eq!(mel.dims(), &[128, 1]);
        assert!(mel
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&x| x == 0.0));
        let err = fe.compute(&[0.0, f32::NAN]).unwrap_err().to_string();
        assert!(err.contains("sample 1"), "{err}");
    }
}
