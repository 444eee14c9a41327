//! The linear echo canceller: a partitioned-block frequency-domain adaptive filter (PBFDAF,
//! overlap-save) with two paths.
//!
//! The echo path is modelled as an FIR filter of `partitions × block` taps on the aligned
//! reference. The taps are kept as `partitions` spectra of `2 × block` points; the filter output
//! for one block is the sum over partitions of (tap spectrum × spectrum of the reference that
//! many blocks ago), which costs one inverse FFT however long the filter is.
//!
//! Adaptation is normalised least mean squares per frequency bin: each bin's step is divided by
//! the reference energy in that bin over the whole filter span (the NLMS `‖x‖²`, bin by bin), so
//! coloured signals like speech converge about as fast as white noise. The gradient is
//! constrained to `block` taps per partition (the other half of each transform is zeroed), which
//! keeps the filter a true linear convolution.
//!
//! Double talk (the user speaking while the echo plays) makes any adaptive filter diverge, since
//! the near-end voice looks like an error to remove. Two defences:
//! - Two paths. A background filter adapts all the time; the foreground filter, whose output is
//!   what leaves the canceller, is only replaced by a copy of the background one when the
//!   background has clearly had less error over the last few blocks. When the background's
//!   error grows well above the foreground's (it diverged during double talk), it is reset to
//!   the foreground. So a burst of double talk can spoil the background for a while but not the
//!   output.
//! - A slower background step while the residual is larger than the foreground's echo estimate
//!   (near-end speech, or an echo path that changed) once the foreground has converged: it
//!   still adapts, so a changed room is learnt again, only more slowly.

use std::sync::Arc;

use realfft::num_complex::Complex32;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

/// Energies of one processed block (sums of squares over the block).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BlockReport {
    /// The microphone block.
    pub mic: f32,
    /// The canceller's output: the microphone minus the foreground's echo estimate (or the
    /// microphone, while the foreground makes things worse).
    pub out: f32,
    /// The foreground's echo estimate.
    pub echo: f32,
    /// The reference block.
    pub reference: f32,
    /// The background filter adapted on this block.
    pub adapted: bool,
}

/// Two-path PBFDAF on aligned signals. See the module documentation.
pub struct AdaptiveFilter {
    block: usize,
    partitions: usize,
    bins: usize,
    step: f32,
    fft: Arc<dyn RealToComplex<f32>>,
    ifft: Arc<dyn ComplexToReal<f32>>,
    /// Spectra of the last `partitions` reference frames (previous block + current block);
    /// partition `p` (p blocks ago) is in slot `(head + p) % partitions`.
    x_spec: Vec<Complex32>,
    /// `|X|²` of the same frames, for the per-bin normalisation.
    x_pow: Vec<f32>,
    head: usize,
    prev_ref: Vec<f32>,
    foreground: Vec<Complex32>,
    background: Vec<Complex32>,
    /// Smoothed block error energies of both paths and of the microphone.
    err_fg: f32,
    err_bg: f32,
    mic_avg: f32,
    /// Slow estimate of the foreground's echo return loss enhancement (power ratio), for the
    /// double-talk step control.
    fg_erle: f32,
    /// The foreground currently adds more than it removes (a stale echo path, right after the
    /// echo moved): the microphone is passed on as it is until that changes.
    bypass: bool,
    /// Adaptation is paused (see [`AdaptiveFilter::freeze`]).
    frozen: bool,
    // Scratch, sized once.
    time: Vec<f32>,
    spec: Vec<Complex32>,
    norm: Vec<f32>,
    err_spec: Vec<Complex32>,
    y_fg: Vec<f32>,
    y_bg: Vec<f32>,
    e_bg: Vec<f32>,
    ref_buf: Vec<f32>,
    mic_buf: Vec<f32>,
    fft_scratch: Vec<Complex32>,
    ifft_scratch: Vec<Complex32>,
}

/// Smoothing of the path comparison (per block of 8 ms: about 60 ms of memory).
const COMPARE_SMOOTHING: f32 = 0.85;
/// The background replaces the foreground when its smoothed error is below this fraction of the
/// foreground's (0.7 dB better).
const COPY_RATIO: f32 = 0.85;
/// The background is reset to the foreground when its smoothed error is above this multiple of
/// the foreground's (3 dB worse).
const RESET_RATIO: f32 = 2.0;
/// Reference blocks quieter than this mean power (-70 dBFS) carry no information to adapt on.
const MIN_REFERENCE_POWER: f32 = 1e-7;
/// Step multiplier for the background while double talk is suspected.
const DOUBLE_TALK_STEP: f32 = 0.1;

impl AdaptiveFilter {
    /// A filter of `partitions × block` taps adapting with `step` (NLMS step per block, 0 < step
    /// ≤ 1; 0.5 is a good default). Zero sizes are raised to 1; the step is clamped.
    pub fn new(block: usize, partitions: usize, step: f32) -> Self {
        let block = block.max(1);
        let partitions = partitions.max(1);
        let n = 2 * block;
        let bins = block + 1;
        let mut planner = RealFftPlanner::<f32>::new();
        let fft = planner.plan_fft_forward(n);
        let ifft = planner.plan_fft_inverse(n);
        let fft_scratch = fft.make_scratch_vec();
        let ifft_scratch = ifft.make_scratch_vec();
        Self {
            block,
            partitions,
            bins,
            step: if step.is_finite() {
                step.clamp(0.0, 1.0)
            } else {
                0.5
            },
            fft,
            ifft,
            x_spec: vec![Complex32::default(); partitions * bins],
            x_pow: vec![0.0; partitions * bins],
            head: 0,
            prev_ref: vec![0.0; block],
            foreground: vec![Complex32::default(); partitions * bins],
            background: vec![Complex32::default(); partitions * bins],
            err_fg: 0.0,
            err_bg: 0.0,
            mic_avg: 0.0,
            fg_erle: 1.0,
            bypass: false,
            frozen: false,
            time: vec![0.0; n],
            spec: vec![Complex32::default(); bins],
            norm: vec![0.0; bins],
            err_spec: vec![Complex32::default(); bins],
            y_fg: vec![0.0; block],
            y_bg: vec![0.0; block],
            e_bg: vec![0.0; block],
            ref_buf: vec![0.0; block],
            mic_buf: vec![0.0; block],
            fft_scratch,
            ifft_scratch,
        }
    }

    /// Samples per block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Filter length in taps.
    pub fn len(&self) -> usize {
        self.block * self.partitions
    }

    /// Always false: a filter has at least one tap.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Forgets the echo path and the reference history.
    pub fn reset(&mut self) {
        self.x_spec.fill(Complex32::default());
        self.x_pow.fill(0.0);
        self.prev_ref.fill(0.0);
        self.foreground.fill(Complex32::default());
        self.background.fill(Complex32::default());
        self.err_fg = 0.0;
        self.err_bg = 0.0;
        self.mic_avg = 0.0;
        self.fg_erle = 1.0;
        self.bypass = false;
    }

    fn forward(&mut self) {
        // The buffers have the lengths the plan was made for, so this cannot fail.
        let _ =
            self.fft
                .process_with_scratch(&mut self.time, &mut self.spec, &mut self.fft_scratch);
    }

    /// Inverse transform of `self.spec` into `self.time`, scaled so that it inverts `forward`.
    fn inverse(&mut self) {
        // A real signal's spectrum has no imaginary part at DC and Nyquist; rounding can leave
        // one, which realfft reports (and ignores). The lengths are right by construction.
        self.spec[0].im = 0.0;
        self.spec[self.bins - 1].im = 0.0;
        let _ =
            self.ifft
                .process_with_scratch(&mut self.spec, &mut self.time, &mut self.ifft_scratch);
        let scale = 1.0 / self.time.len() as f32;
        for v in &mut self.time {
            *v *= scale;
        }
    }

    fn slot(&self, partition: usize) -> usize {
        (self.head + partition) % self.partitions
    }

    /// Echo estimate of `taps` for the current block into `self.time[block..]`.
    fn estimate(&mut self, background: bool) {
        let bins = self.bins;
        self.spec.fill(Complex32::default());
        for p in 0..self.partitions {
            let slot = self.slot(p);
            let x = &self.x_spec[slot * bins..(slot + 1) * bins];
            let taps = if background {
                &self.background[p * bins..(p + 1) * bins]
            } else {
                &self.foreground[p * bins..(p + 1) * bins]
            };
            for ((acc, &w), &x) in self.spec.iter_mut().zip(taps).zip(x) {
                *acc += w * x;
            }
        }
        self.inverse();
    }

    /// Takes in the spectrum of the newest frame: `prev_ref` followed by `reference`.
    fn push_reference(&mut self, reference: &[f32]) -> f32 {
        let b = self.block;
        self.time[..b].copy_from_slice(&self.prev_ref);
        self.time[b..].copy_from_slice(reference);
        self.prev_ref.copy_from_slice(reference);
        self.forward();
        self.head = (self.head + self.partitions - 1) % self.partitions;
        let bins = self.bins;
        let slot = self.head;
        self.x_spec[slot * bins..(slot + 1) * bins].copy_from_slice(&self.spec);
        for (pow, x) in self.x_pow[slot * bins..(slot + 1) * bins]
            .iter_mut()
            .zip(&self.spec)
        {
            *pow = x.norm_sqr();
        }
        reference.iter().map(|v| v * v).sum()
    }

    /// Cancels one block: `mic`, `reference` and `out` are `block` samples long (shorter or
    /// longer slices are zero-padded or cut). `out` receives the microphone minus the
    /// foreground's echo estimate.
    pub fn process_block(
        &mut self,
        mic: &[f32],
        reference: &[f32],
        out: &mut [f32],
    ) -> BlockReport {
        let b = self.block;
        // Slices of the wrong length are zero-padded or cut, and samples that are not finite
        // (a broken source) count as silence: one NaN in the taps would never leave them.
        let clean = |v: Option<&f32>| v.copied().filter(|s| s.is_finite()).unwrap_or(0.0);
        for i in 0..b {
            self.ref_buf[i] = clean(reference.get(i));
            self.mic_buf[i] = clean(mic.get(i));
        }
        let reference = std::mem::take(&mut self.ref_buf);
        let ref_energy = self.push_reference(&reference);
        self.ref_buf = reference;

        self.estimate(false);
        self.y_fg.copy_from_slice(&self.time[b..]);
        self.estimate(true);
        self.y_bg.copy_from_slice(&self.time[b..]);

        let (mut mic_e, mut out_e, mut echo_e, mut bg_e) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
        let bypassed = self.bypass;
        for i in 0..b {
            let d = self.mic_buf[i];
            let e = d - self.y_fg[i];
            let eb = d - self.y_bg[i];
            if let Some(o) = out.get_mut(i) {
                *o = if bypassed { d } else { e };
            }
            self.e_bg[i] = eb;
            mic_e += d * d;
            out_e += e * e;
            echo_e += self.y_fg[i] * self.y_fg[i];
            bg_e += eb * eb;
        }

        let active = ref_energy / b as f32 > MIN_REFERENCE_POWER;
        let mut adapted = false;
        if active && bg_e.is_finite() && out_e.is_finite() {
            self.compare_paths(mic_e, out_e, bg_e, echo_e);
            if !self.frozen {
                adapted = true;
                self.adapt(mic_e, out_e, echo_e);
            }
        }
        BlockReport {
            mic: mic_e,
            out: if bypassed { mic_e } else { out_e },
            echo: echo_e,
            reference: ref_energy,
            adapted,
        }
    }

    /// Foreground/background bookkeeping for one block with an active reference.
    fn compare_paths(&mut self, mic_e: f32, fg_e: f32, bg_e: f32, echo_e: f32) {
        let a = COMPARE_SMOOTHING;
        self.err_fg = a * self.err_fg + (1.0 - a) * fg_e;
        self.err_bg = a * self.err_bg + (1.0 - a) * bg_e;
        self.mic_avg = a * self.mic_avg + (1.0 - a) * mic_e;
        let floor = 1e-9 * self.block as f32;
        if self.err_bg + floor < COPY_RATIO * self.err_fg {
            self.foreground.copy_from_slice(&self.background);
            self.err_fg = self.err_bg;
        } else if self.err_bg > RESET_RATIO * self.err_fg + floor {
            self.background.copy_from_slice(&self.foreground);
            self.err_bg = self.err_fg;
        }
        // A foreground that adds more than it removes (a misaligned or stale echo path) is worse
        // than none: pass the microphone on while it is. It is not thrown away: after an
        // underrun it is right again as soon as the delay has been measured anew, and a truly
        // new echo path is learnt by the background, which then replaces it.
        self.bypass = self.err_fg > self.mic_avg + floor;
        // The foreground's enhancement, slowly, from blocks where the echo estimate is
        // substantial; it only gates the double-talk step control.
        if echo_e > floor && fg_e > 0.0 {
            let inst = (mic_e / fg_e.max(floor)).clamp(1.0, 1e4);
            self.fg_erle = 0.98 * self.fg_erle + 0.02 * inst;
        }
    }

    /// One NLMS step of the background filter on its own error.
    fn adapt(&mut self, _mic_e: f32, fg_e: f32, echo_e: f32) {
        let b = self.block;
        let bins = self.bins;
        // Double talk suspected: the foreground has converged (more than 6 dB of enhancement)
        // and yet the residual is larger than the echo it removes.
        let mut step = self.step;
        if self.fg_erle > 4.0 && fg_e > echo_e {
            step *= DOUBLE_TALK_STEP;
        }
        // Error spectrum: overlap-save wants [0; b] followed by the error block.
        self.time[..b].fill(0.0);
        self.time[b..].copy_from_slice(&self.e_bg);
        self.forward();
        self.err_spec.copy_from_slice(&self.spec);

        // Per-bin normalisation: reference energy over the filter span, with a floor relative to
        // the average over bins so that near-empty bins do not get huge steps.
        self.norm.fill(0.0);
        for p in 0..self.partitions {
            let slot = self.slot(p);
            for (n, &pw) in self
                .norm
                .iter_mut()
                .zip(&self.x_pow[slot * bins..(slot + 1) * bins])
            {
                *n += pw;
            }
        }
        let mean = self.norm.iter().sum::<f32>() / bins as f32;
        let floor = mean * 1e-3 + 1e-6 * (2 * b * self.partitions) as f32;
        for n in &mut self.norm {
            *n = step / (*n + floor);
        }

        for p in 0..self.partitions {
            let slot = self.slot(p);
            for k in 0..bins {
                self.spec[k] =
                    self.x_spec[slot * bins + k].conj() * self.err_spec[k] * self.norm[k];
            }
            self.inverse();
            // Gradient constraint: only the first `b` lags belong to this partition.
            self.time[b..].fill(0.0);
            self.forward();
            for (w, g) in self.background[p * bins..(p + 1) * bins]
                .iter_mut()
                .zip(&self.spec)
            {
                *w += *g;
            }
        }
    }

    /// The foreground's taps in the time domain (`len()` samples).
    pub fn taps(&mut self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.taps_into(false, &mut out);
        out
    }

    fn taps_into(&mut self, background: bool, out: &mut [f32]) {
        let b = self.block;
        let bins = self.bins;
        for p in 0..self.partitions {
            let src = if background {
                &self.background[p * bins..(p + 1) * bins]
            } else {
                &self.foreground[p * bins..(p + 1) * bins]
            };
            self.spec.copy_from_slice(src);
            self.inverse();
            out[p * b..(p + 1) * b].copy_from_slice(&self.time[..b]);
        }
    }

    fn set_taps(&mut self, background: bool, taps: &[f32]) {
        let b = self.block;
        let bins = self.bins;
        for p in 0..self.partitions {
            self.time[..b].copy_from_slice(&taps[p * b..(p + 1) * b]);
            self.time[b..].fill(0.0);
            self.forward();
            let dst = if background {
                &mut self.background[p * bins..(p + 1) * bins]
            } else {
                &mut self.foreground[p * bins..(p + 1) * bins]
            };
            dst.copy_from_slice(&self.spec);
        }
    }

    /// Pauses (or resumes) adaptation; the filter keeps cancelling with what it learnt. For a
    /// converged filter whose output suddenly grows: either the user talks (adapting would
    /// unlearn the echo path) or the echo moved in time (adapting would learn a path that is
    /// only wrong because of the timing, which a new delay measurement puts right).
    pub fn freeze(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// The foreground's strongest tap, once it has learnt something.
    pub fn peak_tap(&mut self) -> Option<usize> {
        let taps = self.taps();
        let (k, peak) = taps.iter().enumerate().fold((0, 0.0f32), |best, (k, t)| {
            if t.abs() > best.1 {
                (k, t.abs())
            } else {
                best
            }
        });
        (peak > 1e-3).then_some(k)
    }

    /// The reference alignment moved: the echo path moves `shift` taps later (earlier when
    /// negative), and `history` is the reference at the new alignment for the last
    /// `len() + block()` samples before the next block (zero-padded at the front if shorter).
    pub fn realign(&mut self, shift: i64, history: &[f32]) {
        let len = self.len();
        let mut taps = vec![0.0; len];
        let mut moved = vec![0.0; len];
        for background in [false, true] {
            self.taps_into(background, &mut taps);
            moved.fill(0.0);
            for (k, m) in moved.iter_mut().enumerate() {
                let from = k as i64 - shift;
                if (0..len as i64).contains(&from) {
                    *m = taps[from as usize];
                }
            }
            self.set_taps(background, &moved);
        }
        // Rebuild the reference spectra, oldest first, so that the newest ends at `head`.
        let b = self.block;
        let need = len + b;
        let mut padded = vec![0.0; need];
        let n = history.len().min(need);
        padded[need - n..].copy_from_slice(&history[history.len() - n..]);
        self.prev_ref.fill(0.0);
        self.x_spec.fill(Complex32::default());
        self.x_pow.fill(0.0);
        self.prev_ref.copy_from_slice(&padded[..b]);
        for chunk in padded[b..].chunks_exact(b) {
            self.push_reference(chunk);
        }
        self.err_fg = 0.0;
        self.err_bg = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in [-1, 1).
    pub(crate) fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    fn convolve(x: &[f32], h: &[f32]) -> Vec<f32> {
        (0..x.len())
            .map(|n| {
                h.iter()
                    .enumerate()
                    .take(n + 1)
                    .map(|(k, hk)| hk * x[n - k])
                    .sum()
            })
            .collect()
    }

    fn room(len: usize, seed: u64) -> Vec<f32> {
        let n = noise(len, seed);
        let mut h: Vec<f32> = n
            .iter()
            .enumerate()
            .map(|(k, v)| v * (-(k as f32) / (len as f32 / 6.0)).exp() * 0.3)
            .collect();
        h[20] += 0.6;
        h
    }

    fn erle(mic: &[f32], out: &[f32]) -> f32 {
        let e = |v: &[f32]| v.iter().map(|s| s * s).sum::<f32>();
        10.0 * (e(mic) / e(out).max(1e-20)).log10()
    }

    fn run(filter: &mut AdaptiveFilter, mic: &[f32], reference: &[f32]) -> Vec<f32> {
        let b = filter.block();
        let mut out = vec![0.0; mic.len()];
        for ((m, r), o) in mic
            .chunks_exact(b)
            .zip(reference.chunks_exact(b))
            .zip(out.chunks_exact_mut(b))
        {
            filter.process_block(m, r, o);
        }
        out
    }

    #[test]
    fn white_noise_echo_is_cancelled_deeply() {
        let x: Vec<f32> = noise(16_000 * 4, 1).iter().map(|v| v * 0.3).collect();
        let h = room(1500, 2);
        let mic = convolve(&x, &h);
        let mut filter = AdaptiveFilter::new(128, 16, 0.5);
        let out = run(&mut filter, &mic, &x);
        let tail = 16_000 * 3;
        let got = erle(&mic[tail..], &out[tail..]);
        assert!(got > 30.0, "ERLE {got:.1} dB");
    }

    #[test]
    fn realign_keeps_the_echo_path() {
        let x: Vec<f32> = noise(16_000 * 4, 3).iter().map(|v| v * 0.3).collect();
        let h = room(1000, 4);
        let mic = convolve(&x, &h);
        let mut filter = AdaptiveFilter::new(128, 16, 0.5);
        let split = 16_000 * 2;
        run(&mut filter, &mic[..split], &x[..split]);
        // From now on the reference arrives 40 samples earlier than before (x_new[n] =
        // x_old[n + 40]), as after a corrected delay estimate.
        let shift = 40;
        let shifted: Vec<f32> = (0..x.len())
            .map(|n| x.get(n + shift).copied().unwrap_or(0.0))
            .collect();
        filter.realign(shift as i64, &shifted[split - filter.len() - 128..split]);
        let out = run(
            &mut filter,
            &mic[split..split + 1280],
            &shifted[split..split + 1280],
        );
        let got = erle(&mic[split..split + 1280], &out);
        assert!(got > 25.0, "ERLE right after realigning {got:.1} dB");
    }

    #[test]
    fn silence_and_odd_lengths_do_not_break_it() {
        let mut filter = AdaptiveFilter::new(128, 4, 0.5);
        let mut out = vec![0.0; 100];
        let report = filter.process_block(&[0.0; 50], &[0.0; 300], &mut out);
        assert_eq!(report.mic, 0.0);
        assert!(!report.adapted);
        let report = filter.process_block(&[f32::NAN; 128], &[f32::INFINITY; 128], &mut out);
        assert!(report.out.is_finite() && report.mic == 0.0);
        let report = filter.process_block(&[0.1; 128], &[0.5; 128], &mut out);
        assert!(report.out.is_finite());
        assert!(filter.taps().iter().all(|t| t.is_finite()));
    }
}
