//! Token sampling as the reference does it: greedy when the temperature is absent or ≤ 0 or
//! top-k is 1; otherwise logits / T, keep every logit ≥ the k-th largest (ties at the cut are
//! kept), softmax, one multinomial draw. Seeded, so runs are reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick a token from logits.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplingParams {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
}

impl SamplingParams {
    pub const GREEDY: Self = Self {
        temperature: None,
        top_k: None,
    };

    pub fn new(temperature: Option<f32>, top_k: Option<usize>) -> Self {
        Self { temperature, top_k }
    }

    pub fn is_greedy(&self) -> bool {
        match self.temperature {
            None => true,
            Some(t) => t <= 0.0 || self.top_k == Some(1),
        }
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<f32>,
    /// Room for finding the top-k threshold without allocating.
    order: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
            order: Vec::new(),
        }
    }

    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// Picks one index of `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() || logits.len() <= 1 {
            return argmax(logits);
        }
        let t = self.params.temperature.unwrap_or(1.0);
        let scratch = &mut self.scratch;
        scratch.clear();
        scratch.extend(
            logits
                .iter()
                .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l / t }),
        );
        if let Some(k) = self.params.top_k.filter(|&k| k > 0 && k < scratch.len()) {
            let threshold = kth_largest(scratch, k, &mut self.order);
            for l in scratch.iter_mut() {
                if *l < threshold {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let max = scratch.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        // Entries cut by top-k contribute e^−∞ = 0: skipping them leaves the sum unchanged.
        let total: f64 = scratch
            .iter()
            .filter(|&&l| l != f32::NEG_INFINITY)
            .map(|&l| ((l - max) as f64).exp())
            .sum();
        let mut r = self.rng.random::<f64>() * total;
        let mut last_kept = 0;
        for (i, &l) in scratch.iter().enumerate() {
            if l == f32::NEG_INFINITY {
                continue;
            }
            last_kept = i;
            r -= ((l - max) as f64).exp();
            if r < 0.0 {
                return i as u32;
            }
        }
        last_kept as u32
    }
}

/// Index of the largest value, the first one on ties (as `torch.argmax`); NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// The k-th largest value (1-based) of `values`, using `room` as scratch (a selection, not a
/// sort: a few microseconds for the 2049 logits of a codebook).
fn kth_largest(values: &[f32], k: usize, room: &mut Vec<f32>) -> f32 {
    room.clear();
    room.extend_from_slice(values);
    *room.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(SamplingParams::GREEDY, 0);
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
        // top_k = 1 is greedy whatever the temperature.
        let mut s = Sampler::new(SamplingParams::new(Some(2.0), Some(1)), 0);
        assert_eq!(s.sample(&[0.0, 0.1, 5.0]), 2);
    }

    #[test]
    fn top_k_keeps_ties_at_the_cut() {
        // k = 2 but three logits tie for second place: all three stay eligible, the 0.0 never.
        let logits = [5.0, 4.0, 4.0, 4.0, 0.0];
        let mut s = Sampler::new(SamplingParams::new(Some(1.0), Some(2)), 7);
        let mut seen = [0usize; 5];
        for _ in 0..4000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(seen[4], 0);
        assert!(seen[1] > 0 && seen[2] > 0 && seen[3] > 0, "{seen:?}");
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams::new(Some(1.0), None), seed);
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let ones = draw(3).iter().filter(|&&i| i == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }
}
