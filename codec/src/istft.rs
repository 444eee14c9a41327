//! Streaming inverse STFT with "same" padding, as the LFM2 audio detokenizer uses it.
//!
//! Batch definition (Vocos-style ISTFT of the reference): for spectral frames `S_0 … S_{F-1}`,
//! `y = OLA_t(w · irfft(S_t))` over hop `H`, then both ends are trimmed by
//! `pad = (N − H) / 2` and every sample is divided by the overlap-added squared window
//! `env = OLA_t(w²)`, trimmed the same way. The output has `F · H` samples.
//!
//! Streaming: spectral frame `t` touches untrimmed samples `[t·H, t·H + N)`, so once `F` frames
//! are in, every untrimmed sample below `F·H` is final. Those are emitted; the last `pad` samples
//! come out at [`StreamingIstft::finish`], normalised by the partial envelope exactly as in batch
//! mode. Frames are accumulated in the same order as a batch run, so the output is bit-identical
//! to running the same frames at once.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner};

use crate::{Error, Result};

/// Transform size of the detokenizer's ISTFT (`ISTFT(1280, 320, 1280)` in the reference).
pub const N_FFT: usize = 1280;
/// Hop between spectral frames: 320 samples = 13.3 ms at 24 kHz.
pub const HOP: usize = 320;
/// Frequency bins per spectral frame, `N_FFT / 2 + 1`.
pub const BINS: usize = N_FFT / 2 + 1;
/// Samples trimmed from each end ("same" padding): `(N_FFT − HOP) / 2 = 480`.
pub const PAD: usize = (N_FFT - HOP) / 2;
/// The reference asserts the trimmed envelope is above this everywhere.
const MIN_ENVELOPE: f32 = 1e-11;

/// The periodic Hann window `0.5 − 0.5·cos(2πn/N)` (`torch.hann_window(N)`).
pub fn periodic_hann(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = 2.0 * std::f64::consts::PI * i as f64 / n as f64;
            (0.5 - 0.5 * x.cos()) as f32
        })
        .collect()
}

/// An overlap-add ISTFT that emits samples as soon as no later frame can change them.
pub struct StreamingIstft {
    window: Vec<f32>,
    window_sq: Vec<f32>,
    plan: Arc<dyn ComplexToReal<f32>>,
    spectrum: Vec<Complex<f32>>,
    frame: Vec<f32>,
    scratch: Vec<Complex<f32>>,
    /// Overlap-added signal for untrimmed samples `start..start + ola.len()`.
    ola: Vec<f32>,
    /// Overlap-added squared window over the same samples.
    env: Vec<f32>,
    /// Untrimmed index of `ola[0]`: everything before it has been emitted or trimmed.
    start: usize,
    /// Spectral frames added since the last reset.
    frames: usize,
}

impl StreamingIstft {
    /// An ISTFT with the given synthesis window of `N_FFT` samples.
    ///
    /// Fails if the window's overlap-added square vanishes somewhere in the output (the
    /// reference asserts the same), which would make the normalisation divide by zero.
    pub fn new(window: Vec<f32>) -> Result<Self> {
        if window.len() != N_FFT {
            return Err(Error::Invalid(format!(
                "ISTFT window has {} samples, expected {N_FFT}",
                window.len()
            )));
        }
        if let Some(bad) = window.iter().find(|w| !w.is_finite()) {
            return Err(Error::Invalid(format!(
                "ISTFT window holds a non-finite value ({bad})"
            )));
        }
        let plan = RealFftPlanner::<f32>::new().plan_fft_inverse(N_FFT);
        let window_sq = window.iter().map(|w| w * w).collect();
        let istft = Self {
            spectrum: plan.make_input_vec(),
            frame: plan.make_output_vec(),
            scratch: plan.make_scratch_vec(),
            window,
            window_sq,
            plan,
            ola: Vec::with_capacity(N_FFT + 6 * HOP),
            env: Vec::with_capacity(N_FFT + 6 * HOP),
            start: 0,
            frames: 0,
        };
        istft.check_envelope()?;
        Ok(istft)
    }

    /// Checks the trimmed envelope of every output of 1 to 10 frames. From 5 frames on the
    /// head, the interior and the tail no longer overlap, so longer outputs only repeat the
    /// interior pattern: a positive envelope here means a positive envelope for any length.
    fn check_envelope(&self) -> Result<()> {
        let span = N_FFT.div_ceil(HOP);
        for frames in 1..=2 * span + 2 {
            let len = (frames - 1) * HOP + N_FFT;
            let mut env = vec![0f32; len];
            for t in 0..frames {
                for (e, w) in env[t * HOP..t * HOP + N_FFT]
                    .iter_mut()
                    .zip(&self.window_sq)
                {
                    *e += w;
                }
            }
            if env[PAD..len - PAD].iter().any(|&e| e <= MIN_ENVELOPE) {
                return Err(Error::Invalid(format!(
                    "ISTFT window: its overlap-added square vanishes in a {frames}-frame output"
                )));
            }
        }
        Ok(())
    }

    /// Forgets every frame: the next frame starts a new signal.
    pub fn reset(&mut self) {
        self.ola.clear();
        self.env.clear();
        self.start = 0;
        self.frames = 0;
    }

    /// Spectral frames added since the last reset.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Adds one spectral frame given as log-magnitude and phase (radians), `BINS` values each:
    /// `S = exp(log_abs) · (cos φ + i sin φ)`, with no clamp on the exponential (as the
    /// reference).
    pub fn push_frame(&mut self, log_abs: &[f32], angle: &[f32]) -> Result<()> {
        if log_abs.len() != BINS || angle.len() != BINS {
            return Err(Error::Invalid(format!(
                "ISTFT frame has {} magnitudes and {} phases, expected {BINS} each",
                log_abs.len(),
                angle.len()
            )));
        }
        for ((s, &m), &p) in self.spectrum.iter_mut().zip(log_abs).zip(angle) {
            let r = m.exp();
            *s = Complex::new(r * p.cos(), r * p.sin());
        }
        // A real inverse transform has no use for the imaginary parts at DC and Nyquist; torch's
        // irfft ignores them, and realfft asks for them to be zero.
        self.spectrum[0].im = 0.0;
        self.spectrum[BINS - 1].im = 0.0;
        self.plan
            .process_with_scratch(&mut self.spectrum, &mut self.frame, &mut self.scratch)
            .map_err(|e| Error::Invalid(format!("inverse FFT failed: {e}")))?;

        // Frame t covers untrimmed samples [t·HOP, t·HOP + N_FFT); `start` never passes t·HOP.
        let offset = self.frames * HOP - self.start;
        let end = offset + N_FFT;
        if self.ola.len() < end {
            self.ola.resize(end, 0.0);
            self.env.resize(end, 0.0);
        }
        // irfft with "backward" normalisation: 1/N on the inverse.
        let scale = 1.0 / N_FFT as f32;
        for (i, (o, e)) in self.ola[offset..end]
            .iter_mut()
            .zip(&mut self.env[offset..end])
            .enumerate()
        {
            *o += self.frame[i] * scale * self.window[i];
            *e += self.window_sq[i];
        }
        self.frames += 1;
        Ok(())
    }

    /// Appends every sample that no later frame can change; returns how many.
    pub fn emit(&mut self, out: &mut Vec<f32>) -> usize {
        let final_end = self.frames * HOP;
        self.drain_to(final_end, out)
    }

    /// Appends the remaining samples up to the end of the trimmed signal (`PAD` samples after
    /// [`emit`](Self::emit)), then resets. Returns how many were appended.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> usize {
        let n = if self.frames == 0 {
            0
        } else {
            self.drain_to(self.frames * HOP + PAD, out)
        };
        self.reset();
        n
    }

    /// Emits untrimmed samples `start..end` that lie past the trimmed head, normalised by the
    /// envelope, and drops them all. Returns how many were emitted.
    fn drain_to(&mut self, end: usize, out: &mut Vec<f32>) -> usize {
        if end <= self.start {
            return 0;
        }
        let n = end - self.start;
        let skip = PAD.saturating_sub(self.start).min(n);
        out.reserve(n - skip);
        out.extend(
            self.ola[skip..n]
                .iter()
                .zip(&self.env[skip..n])
                .map(|(y, e)| y / e),
        );
        self.ola.drain(..n);
        self.env.drain(..n);
        self.start = end;
        n - skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch definition, written out directly: full OLA, trim, divide.
    fn batch(frames: &[(Vec<f32>, Vec<f32>)], window: &[f32]) -> Vec<f32> {
        let plan = RealFftPlanner::<f32>::new().plan_fft_inverse(N_FFT);
        let f = frames.len();
        let len = (f - 1) * HOP + N_FFT;
        let mut y = vec![0f32; len];
        let mut env = vec![0f32; len];
        for (t, (m, p)) in frames.iter().enumerate() {
            let mut spec: Vec<Complex<f32>> = m
                .iter()
                .zip(p)
                .map(|(&m, &p)| Complex::from_polar(m.exp(), p))
                .collect();
            spec[0].im = 0.0;
            spec[BINS - 1].im = 0.0;
            let mut out = vec![0f32; N_FFT];
            plan.process(&mut spec, &mut out).unwrap();
            for i in 0..N_FFT {
                y[t * HOP + i] += out[i] / N_FFT as f32 * window[i];
                env[t * HOP + i] += window[i] * window[i];
            }
        }
        (PAD..len - PAD).map(|n| y[n] / env[n]).collect()
    }

    fn frames(n: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        (0..n)
            .map(|t| {
                let m = (0..BINS)
                    .map(|k| ((k * 7 + t * 13) % 17) as f32 / 10.0 - 1.0)
                    .collect();
                let p = (0..BINS)
                    .map(|k| ((k * 5 + t * 3) % 11) as f32 / 2.0 - 2.5)
                    .collect();
                (m, p)
            })
            .collect()
    }

    #[test]
    fn streaming_emits_1440_then_1920_then_480_and_matches_batch() {
        let window = periodic_hann(N_FFT);
        let frames = frames(6 * 4);
        let want = batch(&frames, &window);
        assert_eq!(want.len(), 4 * 1920);

        let mut istft = StreamingIstft::new(window).unwrap();
        let mut got = Vec::new();
        let mut counts = Vec::new();
        for chunk in frames.chunks(6) {
            for (m, p) in chunk {
                istft.push_frame(m, p).unwrap();
            }
            counts.push(istft.emit(&mut got));
        }
        counts.push(istft.finish(&mut got));
        assert_eq!(counts, vec![1440, 1920, 1920, 1920, 480]);
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-6, "streaming vs direct batch: {max:e}");
    }

    #[test]
    fn emission_does_not_depend_on_how_frames_are_grouped() {
        let frames = frames(18);
        let run = |group: usize| {
            let mut istft = StreamingIstft::new(periodic_hann(N_FFT)).unwrap();
            let mut out = Vec::new();
            for chunk in frames.chunks(group) {
                for (m, p) in chunk {
                    istft.push_frame(m, p).unwrap();
                }
                istft.emit(&mut out);
            }
            istft.finish(&mut out);
            out
        };
        let all = run(18);
        assert_eq!(all.len(), 18 * HOP);
        assert_eq!(run(1), all);
        assert_eq!(run(6), all);
    }

    #[test]
    fn finish_resets_and_empty_finish_emits_nothing() {
        let mut istft = StreamingIstft::new(periodic_hann(N_FFT)).unwrap();
        let mut out = Vec::new();
        assert_eq!(istft.finish(&mut out), 0);
        let f = frames(6);
        for (m, p) in &f {
            istft.push_frame(m, p).unwrap();
        }
        let first = {
            let mut o = Vec::new();
            istft.emit(&mut o);
            istft.finish(&mut o);
            o
        };
        for (m, p) in &f {
            istft.push_frame(m, p).unwrap();
        }
        istft.emit(&mut out);
        istft.finish(&mut out);
        assert_eq!(out, first);
    }

    #[test]
    fn bad_windows_and_frames_are_errors() {
        assert!(StreamingIstft::new(vec![1.0; 10]).is_err());
        assert!(StreamingIstft::new(vec![0.0; N_FFT]).is_err());
        let mut w = periodic_hann(N_FFT);
        w[3] = f32::NAN;
        assert!(StreamingIstft::new(w).is_err());
        let mut istft = StreamingIstft::new(periodic_hann(N_FFT)).unwrap();
        assert!(istft.push_frame(&[0.0; 3], &[0.0; 3]).is_err());
    }
}
