//! Streaming sample-rate conversion of mono audio (rubato's synchronous FFT resampler).

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use crate::AudioError;

/// Converts a mono stream from one fixed rate to another, chunk by chunk, accepting input of any
/// length. Equal rates pass through untouched.
///
/// The resampler's start-up delay is trimmed from the output, so output sample `n` lines up with
/// input time `n / to_rate`; that keeps VAD timestamps and the played-sample count exact.
pub struct StreamResampler {
    from: u32,
    to: u32,
    inner: Option<Fft<f32>>,
    /// Input waiting for a full chunk.
    pending: Vec<f32>,
    scratch: Vec<f32>,
    /// Output frames still to drop from the start (the resampler delay).
    to_trim: usize,
    consumed: u64,
    produced: u64,
}

impl StreamResampler {
    /// A resampler from `from` Hz to `to` Hz, working on chunks of about 10 ms of input.
    pub fn new(from: u32, to: u32) -> Result<Self, AudioError> {
        if from == 0 || to == 0 {
            return Err(AudioError::Resample(format!(
                "cannot resample {from} Hz to {to} Hz"
            )));
        }
        let inner = if from == to {
            None
        } else {
            let chunk = (from as usize / 100).max(16);
            let fft = Fft::<f32>::new(from as usize, to as usize, chunk, 1, FixedSync::Input)
                .map_err(|e| AudioError::Resample(format!("{from} Hz -> {to} Hz: {e}")))?;
            Some(fft)
        };
        let mut resampler = Self {
            from,
            to,
            pending: Vec::new(),
            scratch: Vec::new(),
            to_trim: 0,
            consumed: 0,
            produced: 0,
            inner,
        };
        if let Some(fft) = &resampler.inner {
            resampler.pending.reserve(fft.input_frames_max() * 2);
            resampler.scratch = vec![0.0; fft.output_frames_max()];
            resampler.to_trim = fft.output_delay();
        }
        Ok(resampler)
    }

    pub fn input_rate(&self) -> u32 {
        self.from
    }

    pub fn output_rate(&self) -> u32 {
        self.to
    }

    /// Algorithmic delay: how long after an input sample arrives its output can come out.
    pub fn latency(&self) -> std::time::Duration {
        match &self.inner {
            None => std::time::Duration::ZERO,
            Some(fft) => crate::frames_to_duration(
                (fft.input_frames_next() as u64)
                    + (fft.output_delay() as u64 * u64::from(self.from)) / u64::from(self.to),
                self.from,
            ),
        }
    }

    /// Resamples `input`, appending whatever output is ready to `out`.
    pub fn process(&mut self, input: &[f32], out: &mut Vec<f32>) {
        self.consumed += input.len() as u64;
        let Some(fft) = self.inner.as_mut() else {
            out.extend_from_slice(input);
            self.produced += input.len() as u64;
            return;
        };
        self.pending.extend_from_slice(input);
        let mut start = 0;
        loop {
            let need = fft.input_frames_next();
            if self.pending.len() - start < need {
                break;
            }
            let chunk = &self.pending[start..start + need];
            let written = run_chunk(fft, chunk, &mut self.scratch);
            start += need;
            let skip = written.min(self.to_trim);
            self.to_trim -= skip;
            out.extend_from_slice(&self.scratch[skip..written]);
            self.produced += (written - skip) as u64;
        }
        self.pending.drain(..start);
    }

    /// Pushes out the tail held inside the resampler: after this, the output holds exactly
    /// `input_len * to / from` samples (rounded). The resampler is ready for a new stream.
    pub fn flush(&mut self, out: &mut Vec<f32>) {
        let expected = (self.consumed as u128 * u128::from(self.to) / u128::from(self.from)) as u64;
        if let Some(fft) = self.inner.as_mut() {
            // Each round pads the pending input with zeros to a full chunk; a few rounds push
            // out the delay line. The bound only guards against a resampler that never catches up.
            for _ in 0..64 {
                if self.produced >= expected {
                    break;
                }
                let need = fft.input_frames_next();
                self.pending.resize(need, 0.0);
                let written = run_chunk(fft, &self.pending, &mut self.scratch);
                self.pending.clear();
                let skip = written.min(self.to_trim);
                self.to_trim -= skip;
                let keep = (written - skip).min((expected - self.produced) as usize);
                out.extend_from_slice(&self.scratch[skip..skip + keep]);
                self.produced += keep as u64;
            }
        }
        self.reset();
    }

    /// Forgets all state, as if freshly made.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.consumed = 0;
        self.produced = 0;
        if let Some(fft) = self.inner.as_mut() {
            fft.reset();
            self.to_trim = fft.output_delay();
        }
    }
}

fn run_chunk(fft: &mut Fft<f32>, chunk: &[f32], scratch: &mut [f32]) -> usize {
    let frames_out = scratch.len();
    // Both adapters are built from slices whose lengths were checked against the resampler's
    // own sizes, so neither this nor the processing can fail; a failure would be a bug here.
    let input = InterleavedSlice::new(chunk, 1, chunk.len()).expect("mono input adapter");
    let mut output =
        InterleavedSlice::new_mut(scratch, 1, frames_out).expect("mono output adapter");
    let (_, written) = fft
        .process_into_buffer(&input, &mut output, None)
        .expect("chunk sized by input_frames_next");
    written
}

/// Resamples a whole clip at once (for files and tests).
pub fn resample_clip(input: &[f32], from: u32, to: u32) -> Result<Vec<f32>, AudioError> {
    let mut resampler = StreamResampler::new(from, to)?;
    let mut out = Vec::with_capacity(input.len() * to as usize / from.max(1) as usize + 16);
    resampler.process(input, &mut out);
    resampler.flush(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f32, rate: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    fn check_sine(from: u32, to: u32) {
        let input = sine(440.0, from, from as usize); // one second
                                                      // Feed it in awkward pieces, as a device would.
        let mut resampler = StreamResampler::new(from, to).unwrap();
        let mut out = Vec::new();
        for piece in input.chunks(333) {
            resampler.process(piece, &mut out);
        }
        resampler.flush(&mut out);
        assert_eq!(out.len(), to as usize, "{from} -> {to}: length");
        // The delay is trimmed: the output is the same sine sampled at the new rate, up to a
        // fraction of an output sample (the resampler's delay is not a whole number of samples).
        let (best_err, best_shift) = (-20..=20)
            .map(|k| k as f32 * 0.05)
            .map(|shift| {
                let err = (200..out.len() - 200)
                    .map(|i| {
                        let t = (i as f32 + shift) / to as f32;
                        (out[i] - (2.0 * std::f32::consts::PI * 440.0 * t).sin() * 0.5).abs()
                    })
                    .fold(0.0f32, f32::max);
                (err, shift)
            })
            .fold(
                (f32::MAX, 0.0),
                |best, cur| if cur.0 < best.0 { cur } else { best },
            );
        assert!(
            best_err < 0.01,
            "{from} -> {to}: max error {best_err} at shift {best_shift}"
        );
        assert!(
            best_shift.abs() <= 1.0,
            "{from} -> {to}: misaligned by {best_shift} samples"
        );
    }

    #[test]
    fn resamples_common_rates_with_aligned_output() {
        check_sine(48_000, 16_000);
        check_sine(44_100, 16_000);
        check_sine(24_000, 48_000);
        check_sine(24_000, 44_100);
        check_sine(22_050, 16_000);
    }

    #[test]
    fn equal_rates_pass_through() {
        let input = sine(300.0, 16_000, 1000);
        assert_eq!(resample_clip(&input, 16_000, 16_000).unwrap(), input);
    }

    #[test]
    fn zero_rate_is_an_error_not_a_panic() {
        assert!(StreamResampler::new(0, 16_000).is_err());
        assert!(StreamResampler::new(16_000, 0).is_err());
    }
}
