//! Bulk delay between the reference and its echo in the microphone, by generalised
//! cross-correlation with phase transform (GCC-PHAT).
//!
//! Plain cross-correlation of speech has a broad peak (the low frequencies dominate, and a
//! voice's own periodicity adds side peaks). Dividing the cross-spectrum by its magnitude keeps
//! only the phase, so every frequency band votes equally for the lag and the peak is as sharp
//! as the echo path's first strong arrival. The search is one FFT-based correlation over the
//! whole lag range.

use std::sync::Arc;

use realfft::num_complex::Complex32;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

/// A correlation peak: where the microphone matches the reference best.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelayPeak {
    /// `k` such that `mic[i]` matches `reference[i + k]`.
    pub lag: usize,
    /// Height of the peak over the RMS of the correlation elsewhere in the searched range;
    /// above about 8 the peak is real.
    pub confidence: f32,
}

/// A forward and an inverse real FFT of one size.
type FftPair = (Arc<dyn RealToComplex<f32>>, Arc<dyn ComplexToReal<f32>>);

/// GCC-PHAT with its transforms and buffers kept between calls.
pub struct DelayEstimator {
    planner: RealFftPlanner<f32>,
    size: usize,
    fft: Option<FftPair>,
    a: Vec<f32>,
    b: Vec<f32>,
    spec_a: Vec<Complex32>,
    spec_b: Vec<Complex32>,
    scratch: Vec<Complex32>,
}

impl Default for DelayEstimator {
    fn default() -> Self {
        Self::new()
    }
}

impl DelayEstimator {
    pub fn new() -> Self {
        Self {
            planner: RealFftPlanner::new(),
            size: 0,
            fft: None,
            a: Vec::new(),
            b: Vec::new(),
            spec_a: Vec::new(),
            spec_b: Vec::new(),
            scratch: Vec::new(),
        }
    }

    fn plan(&mut self, size: usize) {
        if self.size == size && self.fft.is_some() {
            return;
        }
        let fft = self.planner.plan_fft_forward(size);
        let ifft = self.planner.plan_fft_inverse(size);
        let scratch = fft.get_scratch_len().max(ifft.get_scratch_len());
        self.scratch = vec![Complex32::default(); scratch];
        self.a = vec![0.0; size];
        self.b = vec![0.0; size];
        self.spec_a = fft.make_output_vec();
        self.spec_b = fft.make_output_vec();
        self.fft = Some((fft, ifft));
        self.size = size;
    }

    /// Finds `lag` in `0..=span` maximising the PHAT-weighted correlation
    /// `Σ mic[i] · reference[i + lag]`. `reference` should hold `mic.len() + span` samples
    /// (shorter is zero-padded). `None` when either signal is silent or too short.
    pub fn find(&mut self, mic: &[f32], reference: &[f32], span: usize) -> Option<DelayPeak> {
        if mic.len() < 256 {
            return None;
        }
        let energy = |v: &[f32]| v.iter().map(|s| s * s).sum::<f32>();
        if energy(mic) <= 1e-9 || energy(reference) <= 1e-9 {
            return None;
        }
        let size = (mic.len() + span + 1).next_power_of_two();
        self.plan(size);
        let (fft, ifft) = self.fft.clone()?;
        self.a.fill(0.0);
        self.b.fill(0.0);
        self.a[..mic.len()].copy_from_slice(mic);
        let n = reference.len().min(size);
        self.b[..n].copy_from_slice(&reference[..n]);
        fft.process_with_scratch(&mut self.a, &mut self.spec_a, &mut self.scratch)
            .ok()?;
        fft.process_with_scratch(&mut self.b, &mut self.spec_b, &mut self.scratch)
            .ok()?;

        // conj(A)·B is the transform of Σ a[i] b[i + k]. PHAT: keep its phase only. Bins with
        // next to no energy in either signal are left out rather than amplified.
        let mut mean = 0.0f32;
        for (a, b) in self.spec_a.iter().zip(&self.spec_b) {
            mean += (a.norm_sqr() * b.norm_sqr()).sqrt();
        }
        mean /= self.spec_a.len() as f32;
        let floor = mean * 1e-4;
        let bins = self.spec_a.len();
        for (k, (a, b)) in self.spec_a.iter_mut().zip(&self.spec_b).enumerate() {
            let cross = a.conj() * b;
            let mag = cross.norm();
            // DC and the band below 60 Hz carry hum and offsets, not the echo.
            let low_cut = k * 16_000 / size < 60;
            *a = if mag > floor && !low_cut && k + 1 < bins {
                cross / mag
            } else {
                Complex32::default()
            };
        }
        ifft.process_with_scratch(&mut self.spec_a, &mut self.a, &mut self.scratch)
            .ok()?;

        let range = &self.a[..=span.min(size - 1)];
        let (lag, peak) =
            range
                .iter()
                .enumerate()
                .map(|(k, v)| (k, v.abs()))
                .fold(
                    (0, 0.0f32),
                    |best, cur| if cur.1 > best.1 { cur } else { best },
                );
        // The background: everything at least 1 ms away from the peak.
        let guard = 16;
        let (mut sum, mut count) = (0.0f64, 0usize);
        for (k, v) in range.iter().enumerate() {
            if k.abs_diff(lag) > guard {
                sum += f64::from(v * v);
                count += 1;
            }
        }
        let rms = (sum / count.max(1) as f64).sqrt() as f32;
        if !peak.is_finite() || peak <= 0.0 {
            return None;
        }
        Some(DelayPeak {
            lag,
            confidence: peak / rms.max(1e-12),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_known_lag_in_coloured_noise() {
        // Low-passed noise (speech-like spectrum tilt), echoed with a lag of 1234 samples and a
        // weaker reflection, under independent noise.
        let mut state = 7u64;
        let mut rnd = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        };
        let mut lp = 0.0;
        let reference: Vec<f32> = (0..30_000)
            .map(|_| {
                lp = 0.9 * lp + 0.1 * rnd();
                lp
            })
            .collect();
        let span = 4000;
        let true_lag = 1234;
        let mic: Vec<f32> = (0..16_000)
            .map(|i| {
                0.5 * reference[i + true_lag] + 0.2 * reference[i + true_lag - 300] + 0.01 * rnd()
            })
            .collect();
        let mut est = DelayEstimator::new();
        let peak = est.find(&mic, &reference[..16_000 + span], span).unwrap();
        assert_eq!(peak.lag, true_lag);
        assert!(peak.confidence > 20.0, "{peak:?}");

        // Unrelated signals: no confident peak.
        let other: Vec<f32> = (0..16_000 + span).map(|_| rnd()).collect();
        let peak = est.find(&mic, &other, span).unwrap();
        assert!(peak.confidence < 6.0, "{peak:?}");
    }

    #[test]
    fn silence_or_short_input_gives_nothing() {
        let mut est = DelayEstimator::new();
        assert_eq!(est.find(&[0.0; 4000], &[0.1; 5000], 1000), None);
        assert_eq!(est.find(&[0.1; 100], &[0.1; 5000], 1000), None);
        assert_eq!(est.find(&[0.1; 4000], &[0.0; 5000], 1000), None);
    }
}
