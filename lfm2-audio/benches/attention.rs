//! Single-query attention over a long cache (`lfm2_audio::ops::attend`), the part of a decode
//! step that grows with the context: LFM2-1.2B's shapes (32 query heads, 8 kv heads, 64 values
//! per head), one layer, at several context lengths.
//!
//!     cargo bench -p lfm2-audio --bench attention
//!
//! Prints the median of 21 runs per length, in ms per layer, on one thread (`attend`) and with
//! the kv heads shared out over a pool of 2 (`attend_pooled`, which stays on one thread below
//! its threshold); a decode step has 6 attention layers. The cache is rotated through copies
//! larger than the L3 cache, as in decoding, where the other layers' weights push it out
//! between two visits.

use lfm2_audio::ops::{attend, attend_pooled};
use lfm2_audio::quant::Threads;
use std::time::Instant;

const HEADS: usize = 32;
const KV: usize = 8;
const HD: usize = 64;

fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn main() {
    let q = values(HEADS * HD, 1);
    let pool = Threads::new(2).expect("a pool of 2");
    println!("| positions | 1 thread, ms per layer | x 6 layers | pool of 2, ms per layer | x 6 layers |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for n in [300usize, 1024, 4096, 8192] {
        // Enough copies of the cache to exceed a 32 MB L3.
        let bytes = 2 * KV * n * HD * 4;
        let copies = std::env::var("ATT_COPIES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or((64 << 20) / bytes + 1);
        let caches: Vec<(Vec<f32>, Vec<f32>)> = (0..copies)
            .map(|c| {
                (
                    values(KV * n * HD, 2 * c as u32 + 2),
                    values(KV * n * HD, 2 * c as u32 + 3),
                )
            })
            .collect();
        let mut scores = vec![0f32; n * HEADS];
        let mut out = vec![0f32; HEADS * HD];
        let mut ms = [0f64; 2];
        for (pooled, m) in ms.iter_mut().enumerate() {
            let mut times = Vec::new();
            for r in 0..21 {
                let (k, v) = &caches[r % copies];
                let keys = |g: usize| &k[g * n * HD..(g + 1) * n * HD];
                let vals = |g: usize| &v[g * n * HD..(g + 1) * n * HD];
                let t = Instant::now();
                if pooled == 1 {
                    attend_pooled(
                        &pool,
                        &q,
                        HEADS,
                        KV,
                        HD,
                        n,
                        keys,
                        vals,
                        0.125,
                        &mut scores,
                        &mut out,
                    );
                } else {
                    attend(
                        &q,
                        HEADS,
                        KV,
                        HD,
                        n,
                        keys,
                        vals,
                        0.125,
                        &mut scores,
                        &mut out,
                    );
                }
                times.push(t.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(&out);
            }
            times.sort_by(f64::total_cmp);
            *m = times[times.len() / 2];
        }
        println!(
            "| {n} | {:.3} | {:.2} | {:.3} | {:.2} |",
            ms[0],
            6.0 * ms[0],
            ms[1],
            6.0 * ms[1]
        );
    }
}
