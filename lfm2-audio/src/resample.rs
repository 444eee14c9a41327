//! Resampling to the model's 16 kHz exactly as the reference does it:
//! `torchaudio.functional.resample` with its defaults (windowed sinc, Hann window,
//! `lowpass_filter_width` 6, `rolloff` 0.99), here as a streaming polyphase FIR whose output is
//! identical to resampling the whole clip at once.
//!
//! With `g = gcd(from, to)`, `o = from/g`, `n = to/g`: output sample `j·n + p` is
//! `Σ_k x[j·o − width + k] · kernel[p][k]`, `k ∈ [0, 2·width + o)`, with zeros outside the input,
//! and the output has `ceil(n·N/o)` samples for `N` input samples.
//!
//! Rates go from [`MIN_RATE`] to [`MAX_RATE`]. The kernel table holds `n·(2·width + o)` taps:
//! a few hundred thousand for the usual rates (8, 11.025, 22.05, 44.1, 48, 96 kHz, ...), but a
//! rate sharing no factor with 16 kHz (44,101 Hz) would need billions. Above [`MAX_TABLE_TAPS`]
//! the taps are computed for each output sample instead, over the band where the windowed sinc is
//! not clamped (`2·width + 2` taps at most); the taps left out are the clamped tails, each below
//! 1e-20, so the output differs from the table's only in the last bits.

/// Lowest rate the resampler accepts.
pub const MIN_RATE: u32 = 1_000;
/// Highest rate the resampler accepts.
pub const MAX_RATE: u32 = 384_000;
/// Largest kernel table kept in memory, in taps (4 MiB).
pub const MAX_TABLE_TAPS: usize = 1 << 20;

const LOWPASS_FILTER_WIDTH: f32 = 6.0;
const ROLLOFF: f64 = 0.99;

/// A streaming resampler between two fixed rates.
#[derive(Debug, Clone)]
pub struct Resampler {
    from: u32,
    to: u32,
    /// `o` and `n`: the rates divided by their gcd.
    orig: usize,
    new: usize,
    width: usize,
    /// `n` kernels of `2·width + o` taps, one per output phase; empty when the taps are computed
    /// per output sample (a table over [`MAX_TABLE_TAPS`]).
    kernels: Vec<Vec<f32>>,
    /// Input not yet fully consumed, starting at absolute input index `buf_start` (which may be
    /// negative: the implicit left padding).
    buf: Vec<f32>,
    buf_start: i64,
    /// Next output block `j` (each block is `n` output samples, from input index `j·o − width`).
    next_block: u64,
    /// Input samples seen.
    consumed: u64,
    /// Output samples produced.
    produced: u64,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Resampler {
    /// A resampler from `from` Hz to `to` Hz, both in [`MIN_RATE`]..=[`MAX_RATE`].
    pub fn new(from: u32, to: u32) -> Result<Self, String> {
        for rate in [from, to] {
            if !(MIN_RATE..=MAX_RATE).contains(&rate) {
                return Err(format!(
                    "sample rate {rate} Hz is not supported (expected {MIN_RATE} to {MAX_RATE} Hz)"
                ));
            }
        }
        let g = gcd(from as u64, to as u64);
        let orig = (from as u64 / g) as usize;
        let new = (to as u64 / g) as usize;
        let (kernels, width) = if orig == new {
            (Vec::new(), 0)
        } else if new.saturating_mul(2 * sinc_width(orig, new) + orig) > MAX_TABLE_TAPS {
            (Vec::new(), sinc_width(orig, new))
        } else {
            sinc_kernels(orig, new)
        };
        Ok(Self {
            from,
            to,
            orig,
            new,
            width,
            kernels,
            buf: Vec::new(),
            buf_start: -(width as i64),
            next_block: 0,
            consumed: 0,
            produced: 0,
        })
    }

    pub fn rates(&self) -> (u32, u32) {
        (self.from, self.to)
    }

    /// Resamples a whole clip at once.
    pub fn resample_all(from: u32, to: u32, input: &[f32]) -> Result<Vec<f32>, String> {
        let mut r = Self::new(from, to)?;
        let mut out = Vec::with_capacity(input.len() * to as usize / from as usize + 2);
        r.push(input, &mut out);
        r.finish(&mut out);
        Ok(out)
    }

    /// Adds input samples and appends every output sample that is now final to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) {
        self.consumed += input.len() as u64;
        if self.orig == self.new {
            out.extend_from_slice(input);
            self.produced += input.len() as u64;
            return;
        }
        if self.buf.is_empty() {
            // The implicit left padding of `width` zeros.
            self.buf.resize((-self.buf_start).max(0) as usize, 0.0);
        }
        self.buf.extend_from_slice(input);
        self.run(out, false);
    }

    /// Ends the stream: appends the remaining output (the input is padded with zeros on the right,
    /// and the output is cut to `ceil(n·N/o)` samples).
    pub fn finish(&mut self, out: &mut Vec<f32>) {
        if self.orig == self.new {
            return;
        }
        if self.buf.is_empty() {
            self.buf.resize((-self.buf_start).max(0) as usize, 0.0);
        }
        self.buf
            .resize(self.buf.len() + self.width + self.orig, 0.0);
        self.run(out, true);
        self.buf.clear();
    }

    /// Resets to the state of a new stream.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.buf_start = -(self.width as i64);
        self.next_block = 0;
        self.consumed = 0;
        self.produced = 0;
    }

    fn run(&mut self, out: &mut Vec<f32>, last: bool) {
        let taps = 2 * self.width + self.orig;
        let total = (self.new as u64 * self.consumed).div_ceil(self.orig as u64);
        loop {
            // Block j reads input indices [j·o − width, j·o − width + taps).
            let first = self.next_block as i64 * self.orig as i64 - self.width as i64;
            let offset = (first - self.buf_start) as usize;
            if offset + taps > self.buf.len() {
                break;
            }
            let window = &self.buf[offset..offset + taps];
            if self.kernels.is_empty() {
                for p in 0..self.new {
                    if last && self.produced >= total {
                        break;
                    }
                    out.push(banded_output(window, self.orig, self.new, self.width, p));
                    self.produced += 1;
                }
            }
            for kernel in &self.kernels {
                if last && self.produced >= total {
                    break;
                }
                // Accumulate as a dot product; the reference's conv1d sums in another order, which
                // changes only the last bits.
                let mut acc = 0f32;
                for (x, k) in window.iter().zip(kernel) {
                    acc += x * k;
                }
                out.push(acc);
                self.produced += 1;
            }
            self.next_block += 1;
        }
        // Drop input no later block reads.
        let keep_from = self.next_block as i64 * self.orig as i64 - self.width as i64;
        let drop = (keep_from - self.buf_start).clamp(0, self.buf.len() as i64) as usize;
        if drop > 0 {
            self.buf.drain(..drop);
            self.buf_start += drop as i64;
        }
    }
}

/// The kernel's half width in input samples: `ceil(6·o / (min(o, n)·rolloff))`.
fn sinc_width(orig: usize, new: usize) -> usize {
    (LOWPASS_FILTER_WIDTH as f64 * orig as f64 / (orig.min(new) as f64 * ROLLOFF)).ceil() as usize
}

/// Tap `k` of phase `p` of torchaudio's `_get_sinc_resample_kernel` for `sinc_interp_hann`, in
/// f32 with the same order of operations: `t = (−p/n + k/o)·base` clamped to ±6,
/// `kernel = sinc(πt)·cos²(πt/12)·base/o`.
fn sinc_tap(orig: usize, new: usize, width: usize, p: usize, k: usize) -> f32 {
    let base = (orig.min(new) as f64 * ROLLOFF) as f32;
    // Python computes base/o in f64 and the product with the window in f32.
    let scale = (orig.min(new) as f64 * ROLLOFF / orig as f64) as f32;
    let pi = std::f32::consts::PI;
    let idx = (k as f32 - width as f32) / orig as f32;
    let phase = -(p as f32) / new as f32;
    let mut t = (phase + idx) * base;
    t = t.clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH);
    let w = (t * pi / LOWPASS_FILTER_WIDTH / 2.0).cos();
    let window = w * w;
    let t = t * pi;
    let sinc = if t == 0.0 { 1.0 } else { t.sin() / t };
    sinc * (window * scale)
}

/// All `n` kernels of `2·width + o` taps.
fn sinc_kernels(orig: usize, new: usize) -> (Vec<Vec<f32>>, usize) {
    let width = sinc_width(orig, new);
    let taps = 2 * width + orig;
    let kernels = (0..new)
        .map(|p| {
            (0..taps)
                .map(|k| sinc_tap(orig, new, width, p, k))
                .collect()
        })
        .collect();
    (kernels, width)
}

/// Output phase `p` of a block whose input window is `window`, with the taps computed over the
/// band where `|t| < 6` (the clamped tails outside it are below 1e-20 and left out).
fn banded_output(window: &[f32], orig: usize, new: usize, width: usize, p: usize) -> f32 {
    // t = 0 at k = width + p·o/n; |t| < 6 within 6·o/base of it (base = min(o, n)·rolloff).
    let centre = width as f64 + p as f64 * orig as f64 / new as f64;
    let reach = LOWPASS_FILTER_WIDTH as f64 * orig as f64 / (orig.min(new) as f64 * ROLLOFF);
    let lo = (centre - reach).floor().max(0.0) as usize;
    let hi = ((centre + reach).ceil() as usize).min(window.len().saturating_sub(1));
    let mut acc = 0f32;
    for (k, x) in window.iter().enumerate().take(hi + 1).skip(lo) {
        acc += x * sinc_tap(orig, new, width, p, k);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::INPUT_SAMPLE_RATE;

    #[test]
    fn widths_match_torchaudio() {
        // 24 kHz -> 16 kHz: o = 3, n = 2, width = ceil(6·3 / (2·0.99)) = 10; 48 kHz: 19.
        assert_eq!(sinc_kernels(3, 2).1, 10);
        assert_eq!(sinc_kernels(3, 1).1, 19);
    }

    #[test]
    fn output_length_is_ceil_n_len_over_o() {
        for (from, len) in [
            (24_000, 1000),
            (48_000, 1001),
            (44_100, 4410),
            (8_000, 333),
            (22_050, 1),
        ] {
            let out = Resampler::resample_all(from, 16_000, &vec![0.1; len]).unwrap();
            let want = (16_000u64 * len as u64).div_ceil(from as u64) as usize;
            assert_eq!(out.len(), want, "{from} Hz, {len} samples");
        }
        assert!(Resampler::resample_all(24_000, 16_000, &[])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn streaming_equals_batch() {
        let input: Vec<f32> = (0..12_345)
            .map(|i| ((i as f32) * 0.013).sin() * 0.5 + ((i * 7 % 11) as f32 - 5.0) * 0.01)
            .collect();
        for from in [8_000, 22_050, 24_000, 44_100, 48_000] {
            let batch = Resampler::resample_all(from, 16_000, &input).unwrap();
            let mut r = Resampler::new(from, 16_000).unwrap();
            let mut streamed = Vec::new();
            for chunk in input.chunks(317) {
                r.push(chunk, &mut streamed);
            }
            r.finish(&mut streamed);
            assert_eq!(streamed, batch, "{from} Hz");
        }
    }

    #[test]
    fn a_tone_passes_and_keeps_its_amplitude() {
        // 440 Hz at 48 kHz -> 16 kHz: amplitude within 1% in the steady part.
        let input: Vec<f32> = (0..48_000)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 48_000.0).sin())
            .collect();
        let out = Resampler::resample_all(48_000, 16_000, &input).unwrap();
        let peak = out[1000..15_000].iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((peak - 1.0).abs() < 0.01, "{peak}");
    }

    #[test]
    fn rates_outside_the_range_are_refused() {
        for rate in [0, 1, 999, 384_001, 999_983, u32::MAX] {
            let err = Resampler::new(rate, INPUT_SAMPLE_RATE).unwrap_err();
            assert!(
                err.contains(&format!("{rate} Hz is not supported")),
                "{err}"
            );
        }
        assert!(Resampler::new(MIN_RATE, INPUT_SAMPLE_RATE).is_ok());
        assert!(Resampler::new(MAX_RATE, INPUT_SAMPLE_RATE).is_ok());
    }

    #[test]
    fn rates_without_a_common_factor_use_a_small_memory_and_match_the_table() {
        // 44,101 Hz: the table would be 16000 x 44135 taps (2.8 GB).
        let r = Resampler::new(44_101, INPUT_SAMPLE_RATE).unwrap();
        assert!(r.kernels.is_empty());
        let input: Vec<f32> = (0..44_101 / 3)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 44_101.0).sin())
            .collect();
        let out = Resampler::resample_all(44_101, INPUT_SAMPLE_RATE, &input).unwrap();
        assert_eq!(out.len(), (16_000 * input.len()).div_ceil(44_101));
        let peak = out[500..4800].iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((peak - 1.0).abs() < 0.01, "{peak}");
        // The banded path against the full table on a rate where both fit: 11,025 Hz -> 16 kHz.
        let input: Vec<f32> = (0..5000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let table = Resampler::resample_all(11_025, INPUT_SAMPLE_RATE, &input).unwrap();
        let mut banded = Resampler::new(11_025, INPUT_SAMPLE_RATE).unwrap();
        banded.kernels.clear();
        let mut out = Vec::new();
        banded.push(&input, &mut out);
        banded.finish(&mut out);
        assert_eq!(out.len(), table.len());
        let err = out
            .iter()
            .zip(&table)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn same_rate_is_identity() {
        let x = vec![0.25, -0.5, 1.0];
        assert_eq!(Resampler::resample_all(16_000, 16_000, &x).unwrap(), x);
    }
}
