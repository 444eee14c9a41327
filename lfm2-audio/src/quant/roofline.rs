//! The memory roofline: how fast the pool's threads can read memory, the bound a decode step
//! (which reads every weight once) is compared against.

use super::layout::AlignedBuf;
use super::Threads;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Bytes each participant claims at a time (256 KiB, about the size of a large matrix's share).
const CHUNK: usize = 256 * 1024;

/// Reads a fresh buffer of `bytes` (rounded to 256 KiB, far larger than the caches) with all
/// the pool's participants, `rounds` times after one warm-up pass, and returns the median read
/// rate in GB/s. Chunks are claimed from a counter, as the matrix products share their rows.
pub fn read_bandwidth(threads: &Threads, bytes: usize, rounds: usize) -> f64 {
    let probe = ReadProbe::new(bytes);
    probe.rate(threads);
    let mut rates: Vec<f64> = (0..rounds).map(|_| probe.rate(threads)).collect();
    rates.sort_by(|a, b| a.total_cmp(b));
    rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A buffer to time plain reads with, kept so that a measurement can be set beside the read rate
/// of its own moment: on a machine whose memory bus changes speed from minute to minute, a rate
/// taken minutes apart says little about a step.
pub struct ReadProbe {
    bytes: AlignedBuf,
}

impl ReadProbe {
    /// Allocates `bytes` (rounded up to 256 KiB) as the weights are allocated (in huge pages
    /// where the system gives them), written once so that every page is really mapped (a zero
    /// page would read from cache).
    pub fn new(bytes: usize) -> Self {
        let words = bytes.div_ceil(CHUNK).max(1) * CHUNK / 8;
        let mut bytes = AlignedBuf::zeroed(words * 8);
        for (i, w) in bytemuck::cast_slice_mut::<u8, u64>(bytes.as_mut_slice())
            .iter_mut()
            .enumerate()
        {
            *w = i as u64;
        }
        Self { bytes }
    }

    /// Bytes in the buffer.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: the buffer holds at least one chunk.
    pub fn is_empty(&self) -> bool {
        self.bytes.len() == 0
    }

    /// One read of the whole buffer by the pool's participants, in GB/s.
    pub fn rate(&self, threads: &Threads) -> f64 {
        let buf: &[u64] = bytemuck::cast_slice(self.bytes.as_slice());
        let next = AtomicUsize::new(0);
        let total = AtomicU64::new(0);
        let start = Instant::now();
        threads.run(|_| {
            let mut acc = 0u64;
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                let from = c * CHUNK / 8;
                if from >= buf.len() {
                    break;
                }
                acc = acc.wrapping_add(sum(&buf[from..(from + CHUNK / 8).min(buf.len())]));
            }
            total.fetch_add(acc, Ordering::Relaxed);
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(total.into_inner());
        self.bytes.len() as f64 / secs / 1e9
    }
}

/// A wrapping sum of the words, with 8 independent accumulators (vectorized by the compiler;
/// with AVX2 when the CPU has it).
fn sum(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { sum_avx2(words) };
    }
    sum_portable(words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(words: &[u64]) -> u64 {
    sum_portable(words)
}

#[inline(always)]
fn sum_portable(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for v in &mut chunks {
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(v[k]);
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &b| a.wrapping_add(b));
    acc.iter().fold(rest, |a, &b| a.wrapping_add(b))
}
