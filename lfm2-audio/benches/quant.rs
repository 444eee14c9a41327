//! Throughput of the quantized kernels (`lfm2_audio::quant`) next to candle's own quantized
//! matmul on the same shapes and data, in one run:
//!
//!     cargo bench -p lfm2-audio --bench quant [-- --quick] [--no-candle]
//!         [--sections roof,mv,hot,mm,overhead,ceiling,step,depth] [--kernels avx512-vnni,scalar]
//!         [--formats q8_0,q4_0,q4_k,q6_k]
//!
//! matvec (decode) is reported as GB/s of weight bytes read (GGML size), with the weights rotated
//! through enough copies to exceed the L3 cache, as in real decoding where ~1.2 GB of weights
//! stream past per token. Before each timed run a plain read of a 256 MB buffer is timed with the
//! same number of threads, and the ratio to it is reported too: the cores and the memory bus are
//! shared with other processes, so the ratio is steadier than the absolute figure. matmul
//! (prefill) is reported as GOPS (2 * rows * cols * tokens / s) and as the equivalent backbone
//! tokens/s, GOPS * 1e9 / (2 * 1.04e9). Every figure is the median of several runs.
//!
//! `step` runs the products of one backbone decode step (Q4_0 and Q8_0, the real shapes and
//! order, 2 threads) against the plain read that `lfm2d bench` takes as the memory roofline,
//! alternating the two, and reports the step's GB/s and its share of that read.
//!
//! `depth` runs the depthformer's products of an audio frame (8 steps of its layers and heads,
//! Q4_0 and Q8_0, 2 threads) after a backbone step's, as generation does, with its layers as
//! loaded and as the model marks them (read again often: prefetched further ahead), frame by
//! frame in turn, and reports both and their ratio.
//!
//! `ceiling` (x86 with AVX2) sets the 4-bit prefill product beside the most this core can do
//! with its instructions: the AVX2 micro-tile's inner step (4 rows x 2 tokens: the loads, the
//! nibble split, `vpmaddubsw` and the 16-bit sums) in a loop whose data sits in L1, against the
//! kernel itself on a product whose data sits in L2, both on one thread.
//!
//! candle's thread count is fixed per process, so its figures come from child processes started
//! with CANDLE_NUM_THREADS = 1 and 2, in which candle's `QMatMul` and our best kernel (on a pool
//! of as many threads) alternate run by run. A candle row shows candle's figure, ours measured
//! alongside it, and `xR`, the median of the per-run speed ratios ours / candle: the ratio is
//! meaningful even when other processes slow both down.

use lfm2_audio::quant::{Format, Kernel, QMatrix, Reread, Threads};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const MV_SHAPES: [(usize, usize); 4] = [(2048, 8192), (8192, 2048), (6144, 2048), (65536, 2048)];
const MM_SHAPES: [(usize, usize); 3] = [(2048, 8192), (8192, 2048), (6144, 2048)];
const PREFILL: usize = 512;
/// Tokens for the scalar kernel's matmul (512 would take minutes).
const PREFILL_SCALAR: usize = 16;
const BACKBONE_PARAMS: f64 = 1.04e9;
const FORMATS: [Format; 4] = [Format::Q8_0, Format::Q4_0, Format::Q4_K, Format::Q6_K];
const ROOF_BYTES: usize = 256 << 20;

#[derive(Clone, Copy)]
struct Cfg {
    runs: usize,
    /// Weight bytes the copies of a matrix must add up to (well above the 32 MB L3).
    cold_bytes: usize,
    /// Minimum duration of one timed run.
    run_time: Duration,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
        (u - 0.5) * 2.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn weights(rows: usize, cols: usize) -> Vec<f32> {
    Rng(0x1234_5678_9ABC_DEF1 ^ (rows * 31 + cols) as u64).vec(rows * cols)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds per call of `f`; each run lasts at least `cfg.run_time` and makes at least
/// `min_calls` calls (`f` gets the call number, to rotate over copies).
fn time_calls(cfg: &Cfg, min_calls: usize, mut f: impl FnMut(usize)) -> f64 {
    f(0); // warm-up: page faults, lazy repacking, thread wake-up
    let mut per_call = Vec::with_capacity(cfg.runs);
    for _ in 0..cfg.runs {
        let start = Instant::now();
        let mut calls = 0;
        while calls < min_calls || start.elapsed() < cfg.run_time {
            f(calls);
            calls += 1;
        }
        per_call.push(start.elapsed().as_secs_f64() / calls as f64);
    }
    median(per_call)
}

/// Like `time_calls` for a product reading `bytes` per call, but before each timed run reads the
/// whole `roof` buffer once with `pool`, so that both see the same load from other processes.
/// Returns the median GB/s and the median of the per-run ratios to the plain read's GB/s.
fn gbs_vs_roof(
    cfg: &Cfg,
    roof: &[u64],
    pool: &Threads,
    bytes: usize,
    min_calls: usize,
    mut f: impl FnMut(usize),
) -> (f64, f64) {
    f(0);
    let (mut gbs, mut ratio) = (Vec::new(), Vec::new());
    for _ in 0..cfg.runs {
        let read = read_once(roof, pool);
        let start = Instant::now();
        let mut calls = 0;
        while calls < min_calls || start.elapsed() < cfg.run_time {
            f(calls);
            calls += 1;
        }
        let g = (bytes * calls) as f64 / start.elapsed().as_secs_f64() / 1e9;
        gbs.push(g);
        ratio.push(g / read);
    }
    (median(gbs), median(ratio))
}

fn roof_buffer() -> Vec<u64> {
    (0..ROOF_BYTES / 8).map(|i| i as u64).collect()
}

/// One plain read of `buf` (u64 sums, vectorized by the compiler), split over the pool in 512 KB
/// chunks the way the products split their rows. Returns GB/s.
fn read_once(buf: &[u64], pool: &Threads) -> f64 {
    let chunk = 1 << 16;
    let next = AtomicUsize::new(0);
    let total = AtomicU64::new(0);
    let start = Instant::now();
    pool.run(|_| loop {
        let c = next.fetch_add(1, Ordering::Relaxed);
        if c * chunk >= buf.len() {
            break;
        }
        let part = &buf[c * chunk..((c + 1) * chunk).min(buf.len())];
        let mut acc = [0u64; 8];
        for v in part.chunks_exact(8) {
            for k in 0..8 {
                acc[k] = acc[k].wrapping_add(v[k]);
            }
        }
        total.fetch_add(
            acc.iter().fold(0, |a, &b| a.wrapping_add(b)),
            Ordering::Relaxed,
        );
    });
    std::hint::black_box(total.into_inner());
    (buf.len() * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn copies_for(bytes: usize, cfg: &Cfg) -> usize {
    cfg.cold_bytes.div_ceil(bytes).max(1)
}

fn tok_s(gops: f64) -> f64 {
    gops * 1e9 / (2.0 * BACKBONE_PARAMS)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let cfg = Cfg {
        runs: if quick { 3 } else { 7 },
        cold_bytes: 160 << 20,
        run_time: Duration::from_millis(if quick { 30 } else { 100 }),
    };
    if let Ok(n) = std::env::var("QUANT_BENCH_CANDLE_CHILD") {
        candle::child(&cfg, n.parse().unwrap_or(1));
        return;
    }
    let list = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>())
    };
    let sections = list("--sections");
    let on = |s: &str| sections.as_ref().is_none_or(|l| l.iter().any(|x| x == s));
    let kernels: Vec<Kernel> = match list("--kernels") {
        Some(names) => Kernel::supported()
            .into_iter()
            .filter(|k| names.iter().any(|n| n == k.name()))
            .collect(),
        None => Kernel::supported(),
    };
    let formats: Vec<Format> = match list("--formats") {
        Some(names) => FORMATS
            .into_iter()
            .filter(|f| names.iter().any(|n| n.eq_ignore_ascii_case(f.name())))
            .collect(),
        None => FORMATS.to_vec(),
    };
    let with_candle = !args.iter().any(|a| a == "--no-candle") && (on("mv") || on("mm"));
    let candle_rows = if with_candle {
        candle::run_children(quick)
    } else {
        Vec::new()
    };
    println!(
        "lfm2-audio quantized kernels; {} cores available; kernels: {}; median of {} runs",
        Threads::available(),
        kernels
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.runs
    );
    let pools: Vec<(Kernel, [Threads; 2])> = kernels
        .iter()
        .map(|&k| {
            let p1 = Threads::with_kernel(1, k).expect("supported");
            let p2 = Threads::with_kernel(2, k).expect("supported");
            (k, [p1, p2])
        })
        .collect();
    let roof = roof_buffer();
    let roof_pools = [Threads::new(1).unwrap(), Threads::new(2).unwrap()];

    if on("roof") {
        let mut g = [0f64; 2];
        for (i, p) in roof_pools.iter().enumerate() {
            read_once(&roof, p);
            g[i] = median((0..cfg.runs).map(|_| read_once(&roof, p)).collect());
        }
        println!(
            "plain memory read ({} MB, u64 sums): {:.1} GB/s with 1 thread, {:.1} GB/s with 2",
            ROOF_BYTES >> 20,
            g[0],
            g[1]
        );
    }

    if on("mv") {
        println!();
        println!(
            "## matvec (decode, one token): GB/s of weights read, weights cold (> L3); in \
             parentheses the ratio to a plain memory read timed just before each run"
        );
        println!();
        println!("| format | rows x cols | MB | kernel | 1 thread | 2 threads |");
        println!("|---|---|---|---|---|---|");
        for &format in &formats {
            for (rows, cols) in MV_SHAPES {
                let m = QMatrix::quantize(&weights(rows, cols), rows, cols, format).unwrap();
                let bytes = m.ggml_bytes();
                let copies: Vec<QMatrix> =
                    (0..copies_for(bytes, &cfg)).map(|_| m.clone()).collect();
                drop(m);
                let x = Rng(7).vec(cols);
                let mut y = vec![0f32; rows];
                for (k, pool) in &pools {
                    let mut cells = Vec::new();
                    for (p, rp) in pool.iter().zip(&roof_pools) {
                        let (g, r) = gbs_vs_roof(&cfg, &roof, rp, bytes, copies.len(), |c| {
                            copies[c % copies.len()].matvec(&x, &mut y, p).unwrap()
                        });
                        cells.push(format!("{g:.1} ({:.0} %)", r * 100.0));
                    }
                    println!(
                        "| {format} | {rows}x{cols} | {:.1} | {k} | {} | {} |",
                        bytes as f64 / 1e6,
                        cells[0],
                        cells[1]
                    );
                }
                candle::print_rows(&candle_rows, "mv", format, rows, cols, bytes);
            }
        }
    }

    if on("hot") {
        println!();
        println!("## matvec, weights hot in L3 (one 2048x2048 matrix reused): GB/s");
        println!();
        println!("| format | kernel | 1 thread | 2 threads |");
        println!("|---|---|---|---|");
        for &format in &formats {
            let m = QMatrix::quantize(&weights(2048, 2048), 2048, 2048, format).unwrap();
            let x = Rng(8).vec(2048);
            let mut y = vec![0f32; 2048];
            for (k, pool) in &pools {
                let mut gbs = [0f64; 2];
                for (i, p) in pool.iter().enumerate() {
                    let s = time_calls(&cfg, 1, |_| m.matvec(&x, &mut y, p).unwrap());
                    gbs[i] = m.ggml_bytes() as f64 / s / 1e9;
                }
                println!("| {format} | {k} | {:.1} | {:.1} |", gbs[0], gbs[1]);
            }
        }
    }

    if on("mm") {
        println!();
        println!(
            "## matmul (prefill, {PREFILL} tokens; scalar: {PREFILL_SCALAR}): GOPS \
             (backbone-equivalent tokens/s)"
        );
        println!();
        println!("| format | rows x cols | kernel | 1 thread | 2 threads |");
        println!("|---|---|---|---|---|");
        let mm_cfg = Cfg {
            runs: if quick { 3 } else { 5 },
            run_time: Duration::from_millis(1),
            ..cfg
        };
        for &format in &formats {
            for (rows, cols) in MM_SHAPES {
                let m = QMatrix::quantize(&weights(rows, cols), rows, cols, format).unwrap();
                for (k, pool) in &pools {
                    let t = if *k == Kernel::Scalar {
                        PREFILL_SCALAR
                    } else {
                        PREFILL
                    };
                    let x = Rng(9).vec(t * cols);
                    let mut y = vec![0f32; t * rows];
                    let mut cells = Vec::new();
                    for p in pool {
                        let s = time_calls(&mm_cfg, 1, |_| m.matmul(&x, t, &mut y, p).unwrap());
                        let gops = 2.0 * (rows * cols * t) as f64 / s / 1e9;
                        cells.push(format!("{gops:.0} ({:.0} tok/s)", tok_s(gops)));
                    }
                    println!(
                        "| {format} | {rows}x{cols} | {k} | {} | {} |",
                        cells[0], cells[1]
                    );
                }
                candle::print_rows(&candle_rows, "mm", format, rows, cols, 0);
            }
        }
    }

    if on("overhead") {
        overhead(&cfg);
    }

    if on("ceiling") {
        ceiling(&cfg);
    }

    // The step and the frame are timed in the formats of the plain presets (q4, q8).
    let model_formats = formats
        .iter()
        .copied()
        .filter(|f| matches!(f, Format::Q8_0 | Format::Q4_0));
    if on("depth") {
        for format in model_formats.clone() {
            depth(&cfg, format);
        }
    }
    if on("step") {
        for format in model_formats {
            step(&cfg, format);
        }
    }
}

/// The products of one backbone decode step, in the model's order and shapes (16 layers of
/// which 6 attend, fused where the model fuses them, and the 65 536-row text head).
fn step_products(format: Format) -> Vec<Vec<QMatrix>> {
    const ATTENTION: [usize; 6] = [2, 5, 8, 10, 12, 14];
    let (dim, ff, kv, vocab) = (2048, 8192, 512, 65536);
    let m = |rows: usize, cols: usize| {
        QMatrix::quantize(&weights(rows, cols), rows, cols, format).expect("valid shape")
    };
    let mut products: Vec<Vec<QMatrix>> = Vec::new();
    for layer in 0..16 {
        if ATTENTION.contains(&layer) {
            products.push(vec![m(dim, dim), m(kv, dim), m(kv, dim)]);
        } else {
            products.push(vec![m(3 * dim, dim)]);
        }
        products.push(vec![m(dim, dim)]);
        products.push(vec![m(ff, dim), m(ff, dim)]);
        products.push(vec![m(dim, ff)]);
    }
    products.push(vec![m(vocab, dim)]);
    products
}

/// A list of products (each group of matrices sharing one input) with its inputs, one per
/// width, and its outputs.
struct Products {
    groups: Vec<Vec<QMatrix>>,
    inputs: Vec<Vec<f32>>,
    outs: Vec<Vec<Vec<f32>>>,
}

impl Products {
    fn new(groups: Vec<Vec<QMatrix>>) -> Self {
        let mut inputs: Vec<Vec<f32>> = Vec::new();
        for ms in &groups {
            if !inputs.iter().any(|x| x.len() == ms[0].cols()) {
                inputs.push(weights(1, ms[0].cols()));
            }
        }
        let outs = groups
            .iter()
            .map(|ms| ms.iter().map(|m| vec![0f32; m.rows()]).collect())
            .collect();
        Self {
            groups,
            inputs,
            outs,
        }
    }

    /// Weight bytes read by one run.
    fn bytes(&self) -> usize {
        self.groups.iter().flatten().map(QMatrix::ggml_bytes).sum()
    }

    /// Runs every product once on `pool`; returns the seconds it took.
    fn run(&mut self, pool: &Threads) -> f64 {
        let start = Instant::now();
        for (ms, ys) in self.groups.iter().zip(self.outs.iter_mut()) {
            let x = self.inputs.iter().find(|x| x.len() == ms[0].cols());
            let ms: Vec<&QMatrix> = ms.iter().collect();
            let mut ys: Vec<&mut [f32]> = ys.iter_mut().map(Vec::as_mut_slice).collect();
            QMatrix::matvec_many(&ms, x.expect("an input of each width"), &mut ys, pool)
                .expect("shapes match");
        }
        start.elapsed().as_secs_f64()
    }
}

/// A decode step's products (see [`step_products`]) on two threads with the best kernel,
/// against the plain read `lfm2d bench` takes as the roofline (2 threads, 512 MB allocated as
/// the weights are). The two alternate round by round, so the percentage compares them at the
/// same moment of a machine whose bus speed drifts.
fn step(cfg: &Cfg, format: Format) {
    let mut products = Products::new(step_products(format));
    let bytes = products.bytes();
    let pool = Threads::new(2).expect("a pool");
    let mut run = || bytes as f64 / products.run(&pool) / 1e9;
    run();
    let (mut gbs, mut reads, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.runs {
        let read = lfm2_audio::quant::read_bandwidth(&pool, 512 << 20, 1);
        let g = median((0..5).map(|_| run()).collect());
        gbs.push(g);
        reads.push(read);
        ratios.push(g / read);
    }
    println!();
    println!(
        "## a decode step's products, {}: {} products, {:.0} MB, 2 threads, {}",
        format.name(),
        products.groups.len(),
        bytes as f64 / 1e6,
        pool.kernel().name()
    );
    println!();
    println!(
        "{:.1} GB/s ({:.1} steps/s), {:.0} % of a plain read of {:.1} GB/s (medians of {} rounds)",
        median(gbs.clone()),
        median(gbs) * 1e9 / bytes as f64,
        median(ratios) * 100.0,
        median(reads),
        cfg.runs
    );
}

/// The depthformer's products in an audio frame: 8 steps of its 6 layers (fused as the model
/// fuses them) and one codebook head each, each frame after the backbone's products (without
/// the text head), as generation runs them. The layers run once as loaded and once marked
/// [`Reread::Often`], as the model marks them, alternating frame by frame; the backbone step
/// between frames is untimed.
fn depth(cfg: &Cfg, format: Format) {
    let (dim, ff, qkv) = (1024, 2816, 1536);
    let m = |rows: usize, cols: usize, seed: usize| {
        let w = Rng(0x5EED ^ seed as u64).vec(rows * cols);
        QMatrix::quantize(&w, rows, cols, format).expect("valid shape")
    };
    let mut groups = Vec::new();
    for l in 0..6 {
        groups.push(vec![m(qkv, dim, 4 * l)]);
        groups.push(vec![m(dim, dim, 4 * l + 1)]);
        groups.push(vec![m(ff, dim, 4 * l + 2), m(ff, dim, 4 * l + 3)]);
        groups.push(vec![m(dim, ff, 4 * l + 100)]);
    }
    let mut marked = groups.clone();
    for m in marked.iter_mut().flatten() {
        m.set_reread(Reread::Often);
    }
    let mut layers = [Products::new(groups), Products::new(marked)];
    let mut heads: Vec<Products> = (0..8)
        .map(|c| Products::new(vec![vec![m(2049, dim, 1000 + c)]]))
        .collect();
    let mut backbone = step_products(format);
    backbone.pop(); // audio frames skip the text head
    let mut backbone = Products::new(backbone);
    let pool = Threads::new(2).expect("a pool");
    let bytes = 8 * layers[0].bytes() + heads.iter().map(Products::bytes).sum::<usize>();
    let mut frame = |variant: usize| {
        backbone.run(&pool);
        let mut secs = 0.0;
        for head in heads.iter_mut() {
            secs += layers[variant].run(&pool);
            secs += head.run(&pool);
        }
        secs * 1e3
    };
    frame(0);
    frame(1);
    let (mut plain, mut hinted, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.runs {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            a.push(frame(0));
            b.push(frame(1));
        }
        let (a, b) = (median(a), median(b));
        plain.push(a);
        hinted.push(b);
        ratios.push(b / a);
    }
    println!();
    println!(
        "## the depthformer's products a frame, {}: 8 x 25 products, {:.0} MB, after a backbone \
         step, 2 threads, {}",
        format.name(),
        bytes as f64 / 1e6,
        pool.kernel().name()
    );
    println!();
    println!(
        "layers as loaded {:.2} ms, marked read-often (as the model runs them) {:.2} ms: \
         x{:.2} (medians of {} rounds)",
        median(plain),
        median(hinted),
        median(ratios),
        cfg.runs
    );
}

/// The 4-bit AVX2 prefill product against its own instruction mix (see the module's text).
fn ceiling(cfg: &Cfg) {
    println!();
    println!("## ceiling of the 4-bit AVX2 prefill product, one thread (GOPS, 2 per multiply-add)");
    println!();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        let timed = Cfg {
            run_time: Duration::from_millis(200),
            ..*cfg
        };
        let steps = 1 << 20;
        // SAFETY: AVX2 was detected just above.
        let s = time_calls(&timed, 1, |_| unsafe { mix::q4_tile_steps(steps) });
        let mix_gops = 2.0 * (mix::STEP_MACS * steps) as f64 / s / 1e9;
        let (rows, cols, t) = (512, 2048, 64);
        let m = QMatrix::quantize(&weights(rows, cols), rows, cols, Format::Q4_0).unwrap();
        let pool = Threads::with_kernel(1, Kernel::Avx2).expect("AVX2 was detected");
        let x = Rng(12).vec(t * cols);
        let mut y = vec![0f32; t * rows];
        let s = time_calls(&timed, 1, |_| m.matmul(&x, t, &mut y, &pool).unwrap());
        let kernel_gops = 2.0 * (rows * cols * t) as f64 / s / 1e9;
        println!("- the micro-tile's inner step alone, data in L1: {mix_gops:.1}");
        println!(
            "- the kernel, Q4_0 {rows}x{cols} x {t} tokens (data in L2): {kernel_gops:.1}, \
             {:.0} % of the step alone",
            100.0 * kernel_gops / mix_gops
        );
        return;
    }
    let _ = cfg;
    println!("- needs x86-64 with AVX2");
}

/// The instruction mix of the AVX2 4-bit micro-tile, without the rest of the kernel.
#[cfg(target_arch = "x86_64")]
mod mix {
    use std::arch::x86_64::*;

    /// Multiply-adds per step: 4 rows x 2 tokens x 64 values (one packed vector a row).
    pub const STEP_MACS: usize = 4 * 2 * 64;
    /// Steps over distinct data before the loop comes round again (8 KiB of each, in L1).
    const SPREAD: usize = 64;

    #[repr(C, align(64))]
    struct Lines([u8; SPREAD * 128]);

    /// Runs `steps` steps of the micro-tile: per step, 4 packed weight vectors and 2 tokens'
    /// low and high activation vectors are loaded, each weight vector is split into its nibble
    /// halves, and each row and token adds two `vpmaddubsw` products to its 16-bit sums.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn q4_tile_steps(steps: usize) {
        let mut w = Lines([0; SPREAD * 128]);
        let mut x = Lines([0; SPREAD * 128]);
        for (i, (a, b)) in w.0.iter_mut().zip(x.0.iter_mut()).enumerate() {
            *a = (i * 7) as u8;
            *b = ((i * 13) & 0x3f) as u8;
        }
        let (w, x) = (std::hint::black_box(&w), std::hint::black_box(&x));
        let nib = _mm256_set1_epi8(0x0F);
        let mut s = [[_mm256_setzero_si256(); 2]; 4];
        for k in 0..steps {
            let at = (k % SPREAD) * 128;
            // SAFETY: `at + 128` is within both buffers, which are 64-byte aligned.
            unsafe {
                let xp = x.0.as_ptr().add(at);
                let wp = w.0.as_ptr().add(at);
                let xv = |o: usize| _mm256_load_si256(xp.add(o).cast());
                let (xl0, xh0, xl1, xh1) = (xv(0), xv(32), xv(64), xv(96));
                for (i, row) in s.iter_mut().enumerate() {
                    let raw = _mm256_load_si256(wp.add(i * 32).cast());
                    let lo = _mm256_and_si256(raw, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib);
                    row[0] = _mm256_add_epi16(
                        row[0],
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, xl0),
                            _mm256_maddubs_epi16(hi, xh0),
                        ),
                    );
                    row[1] = _mm256_add_epi16(
                        row[1],
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, xl1),
                            _mm256_maddubs_epi16(hi, xh1),
                        ),
                    );
                }
            }
        }
        std::hint::black_box(s);
    }
}

fn overhead(cfg: &Cfg) {
    println!();
    println!("## per-call overhead, µs (best kernel)");
    println!();
    let best = Kernel::best();
    let pool2 = Threads::with_kernel(2, best).unwrap();
    let pool1 = Threads::with_kernel(1, best).unwrap();
    let fast = Cfg {
        cold_bytes: 0,
        run_time: Duration::from_millis(50),
        ..*cfg
    };
    let us = |s: f64| s * 1e6;
    let empty = time_calls(&fast, 1, |_| pool2.run(|_| {}));
    println!(
        "- empty fork/join on 2 threads (worker spinning): {:.2}",
        us(empty)
    );
    let tiny = QMatrix::quantize(&weights(64, 512), 64, 512, Format::Q8_0).unwrap();
    let (x, mut y) = (Rng(10).vec(512), vec![0f32; 64]);
    let t1 = time_calls(&fast, 1, |_| tiny.matvec(&x, &mut y, &pool1).unwrap());
    println!(
        "- 64x512 Q8_0 matvec (runs on the calling thread): {:.2}",
        us(t1)
    );
    let small = QMatrix::quantize(&weights(512, 2048), 512, 2048, Format::Q4_0).unwrap();
    let (x, mut y) = (Rng(11).vec(2048), vec![0f32; 512]);
    for (n, p) in [(1, &pool1), (2, &pool2)] {
        let t = time_calls(&fast, 1, |_| small.matvec(&x, &mut y, p).unwrap());
        println!(
            "- 512x2048 Q4_0 matvec (590 KB, cache-hot), {n} thread(s): {:.2}",
            us(t)
        );
    }
    pool2.set_spin(Duration::ZERO);
    let parked = Cfg {
        run_time: Duration::from_millis(20),
        ..fast
    };
    let mut wakes = Vec::new();
    time_calls(&parked, 1, |_| {
        std::thread::sleep(Duration::from_micros(300));
        let t = Instant::now();
        pool2.run(|_| {});
        wakes.push(t.elapsed().as_secs_f64());
    });
    println!(
        "- fork/join waking a parked worker (spin disabled): {:.1}",
        us(median(wakes))
    );
}

mod candle {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// (kind "mv"/"mm", format, rows, cols, threads, candle's figure, ours measured alongside,
    /// median of the per-run ratios candle time / our time)
    pub type Row = (String, String, usize, usize, usize, f64, f64, f64);

    pub fn run_children(quick: bool) -> Vec<Row> {
        let mut out = Vec::new();
        let Ok(exe) = std::env::current_exe() else {
            return out;
        };
        for n in [1usize, 2] {
            eprintln!("running candle with {n} thread(s)...");
            let mut cmd = std::process::Command::new(&exe);
            cmd.env("QUANT_BENCH_CANDLE_CHILD", n.to_string())
                .env("CANDLE_NUM_THREADS", n.to_string())
                .env("RAYON_NUM_THREADS", n.to_string());
            if quick {
                cmd.arg("--quick");
            }
            let Ok(res) = cmd.output() else { continue };
            for line in String::from_utf8_lossy(&res.stdout).lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() == 8 && f[0] == "CANDLE" {
                    let num = |i: usize| f[i].parse::<f64>().ok();
                    if let (Ok(r), Ok(c), Some(v), Some(o), Some(q)) =
                        (f[3].parse(), f[4].parse(), num(5), num(6), num(7))
                    {
                        out.push((f[1].to_string(), f[2].to_string(), r, c, n, v, o, q));
                    }
                }
            }
        }
        out
    }

    pub fn print_rows(
        all: &[Row],
        kind: &str,
        format: Format,
        rows: usize,
        cols: usize,
        bytes: usize,
    ) {
        let cell = |n: usize| {
            let row = all.iter().find(|r| {
                r.0 == kind && r.1 == format.name() && r.2 == rows && r.3 == cols && r.4 == n
            });
            match (row, kind) {
                (None, _) => "n/a".to_string(),
                (Some(r), "mv") => format!("{:.1} (ours {:.1}: x{:.2})", r.5, r.6, r.7),
                (Some(r), _) => format!(
                    "{:.0} ({:.0} tok/s; ours {:.0}: x{:.2})",
                    r.5,
                    tok_s(r.5),
                    r.6,
                    r.7
                ),
            }
        };
        if kind == "mv" {
            println!(
                "| {format} | {rows}x{cols} | {:.1} | candle QMatMul | {} | {} |",
                bytes as f64 / 1e6,
                cell(1),
                cell(2)
            );
        } else {
            println!(
                "| {format} | {rows}x{cols} | candle QMatMul | {} | {} |",
                cell(1),
                cell(2)
            );
        }
    }

    fn qmatmul(w: &[f32], rows: usize, cols: usize, format: Format) -> QMatMul {
        let dt = match format {
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q4_K => GgmlDType::Q4K,
            Format::Q6_K => GgmlDType::Q6K,
        };
        let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu).unwrap();
        QMatMul::from_qtensor(QTensor::quantize(&t, dt).unwrap()).unwrap()
    }

    /// Runs in a child process whose candle thread count was set through the environment.
    /// Alternates runs of `a` and `b` (each at least `cfg.run_time` and `min_calls` calls) so
    /// that both see the same load; returns the median seconds per call of each and the median
    /// of the per-run ratios time(a) / time(b).
    fn alternate(
        cfg: &Cfg,
        min_calls: usize,
        mut a: impl FnMut(usize),
        mut b: impl FnMut(usize),
    ) -> (f64, f64, f64) {
        let run = |f: &mut dyn FnMut(usize)| {
            let start = Instant::now();
            let mut calls = 0;
            while calls < min_calls || start.elapsed() < cfg.run_time {
                f(calls);
                calls += 1;
            }
            start.elapsed().as_secs_f64() / calls as f64
        };
        a(0);
        b(0);
        let (mut ta, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.runs {
            let x = run(&mut a);
            let y = run(&mut b);
            ta.push(x);
            tb.push(y);
            ratio.push(x / y);
        }
        (median(ta), median(tb), median(ratio))
    }

    /// Runs in a child process whose candle thread count was set through the environment:
    /// candle and our best kernel (with a pool of as many threads) alternate, so their ratio
    /// is measured under the same conditions.
    pub fn child(cfg: &Cfg, threads: usize) {
        let ours = Threads::new(threads).unwrap();
        for format in FORMATS {
            for (rows, cols) in MV_SHAPES {
                let w = weights(rows, cols);
                let bytes = rows * cols / 32 * format.block_bytes();
                let n = copies_for(bytes, cfg);
                let copies: Vec<QMatMul> =
                    (0..n).map(|_| qmatmul(&w, rows, cols, format)).collect();
                let q = QMatrix::quantize(&w, rows, cols, format).unwrap();
                let qcopies: Vec<QMatrix> = (0..n).map(|_| q.clone()).collect();
                drop((w, q));
                let xv = Rng(7).vec(cols);
                let x = Tensor::from_slice(&xv, (1, cols), &Device::Cpu).unwrap();
                for c in &copies {
                    c.forward(&x).unwrap(); // candle repacks some formats lazily on first use
                }
                let mut y = vec![0f32; rows];
                let (tc, to, r) = alternate(
                    cfg,
                    n,
                    |c| {
                        std::hint::black_box(copies[c % n].forward(&x).unwrap());
                    },
                    |c| qcopies[c % n].matvec(&xv, &mut y, &ours).unwrap(),
                );
                let gb = |t: f64| bytes as f64 / t / 1e9;
                println!(
                    "CANDLE mv {} {rows} {cols} {} {} {r}",
                    format.name(),
                    gb(tc),
                    gb(to)
                );
            }
            let mm_cfg = Cfg {
                runs: cfg.runs.min(5),
                cold_bytes: 0,
                run_time: Duration::from_millis(1),
            };
            for (rows, cols) in MM_SHAPES {
                let w = weights(rows, cols);
                let m = qmatmul(&w, rows, cols, format);
                let q = QMatrix::quantize(&w, rows, cols, format).unwrap();
                let xv = Rng(9).vec(PREFILL * cols);
                let x = Tensor::from_slice(&xv, (PREFILL, cols), &Device::Cpu).unwrap();
                let mut y = vec![0f32; PREFILL * rows];
                let (tc, to, r) = alternate(
                    &mm_cfg,
                    1,
                    |_| {
                        std::hint::black_box(m.forward(&x).unwrap());
                    },
                    |_| q.matmul(&xv, PREFILL, &mut y, &ours).unwrap(),
                );
                let gops = |t: f64| 2.0 * (rows * cols * PREFILL) as f64 / t / 1e9;
                println!(
                    "CANDLE mm {} {rows} {cols} {} {} {r}",
                    format.name(),
                    gops(tc),
                    gops(to)
                );
            }
        }
    }
}
