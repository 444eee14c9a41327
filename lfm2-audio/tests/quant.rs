//! Tests of the quantized matrices (`lfm2_audio::quant`): GGML block compatibility, error bounds,
//! agreement of every kernel path, odd shapes, serialization and the thread pool.

use lfm2_audio::quant::{Format, Kernel, QMatrix, Threads, BLOCK};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const FORMATS: [Format; 2] = [Format::Q8_0, Format::Q4_0];

/// Deterministic pseudo-random numbers (xorshift64*), roughly Gaussian via a sum of uniforms,
/// with occasional outliers like real weights and activations have.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * 1.732
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v = self.normal();
                if self.next_u64().is_multiple_of(97) {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }
}

/// Decodes GGML blocks independently of the library (the layout as ggml-common.h defines it).
fn decode_ggml(format: Format, data: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for blk in data.chunks_exact(format.block_bytes()) {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match format {
            Format::Q8_0 => out.extend(blk[2..].iter().map(|&q| d * (q as i8) as f32)),
            Format::Q4_0 => {
                let qs = &blk[2..];
                out.extend(qs.iter().map(|&q| d * ((q & 15) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
            _ => unreachable!("K-quants are tested in quant_k.rs"),
        }
    }
    out
}

/// f64 reference of `y[j][r] = sum_c w[r][c] * x[j][c]`.
fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, t: usize) -> Vec<f64> {
    let mut y = vec![0f64; t * rows];
    for j in 0..t {
        for r in 0..rows {
            y[j * rows + r] = (0..cols)
                .map(|c| w[r * cols + c] as f64 * x[j * cols + c] as f64)
                .sum();
        }
    }
    y
}

/// The activation as the kernels see it: per block of 32, `d = amax / 127`, `q = round(x / d)`
/// with ties to even, value `d * q`.
fn quantize_activation(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks_exact(BLOCK) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(b.iter().map(|v| d * (v * id).round_ties_even()));
    }
    out
}

/// Sum of |w * x| per output: the scale that float rounding errors are relative to.
fn magnitude(w: &[f32], x: &[f32], rows: usize, cols: usize, t: usize) -> Vec<f64> {
    let wa: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    reference(&wa, &xa, rows, cols, t)
}

fn rel_rms(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    let den: f64 = b.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

fn threads(n: usize, kernel: Kernel) -> Threads {
    Threads::with_kernel(n, kernel).expect("kernel supported")
}

// ------------------------------------------------------------------------------------------
// Block formats.

#[test]
fn q8_0_pinned_block() {
    let mut x = [0f32; 32];
    for (j, v) in x.iter_mut().enumerate() {
        *v = j as f32 - 16.0;
    }
    x[..7].copy_from_slice(&[127.0, -127.0, 0.5, -0.5, 2.5, -2.5, 1.49]);
    let m = QMatrix::quantize(&x, 1, 32, Format::Q8_0).unwrap();
    // amax = 127 -> d = 1.0 (f16 0x3C00); roundf rounds halves away from zero.
    let mut expected = vec![0x00, 0x3C, 127, 0x81, 1, 0xFF, 3, 0xFD, 1];
    expected.extend((7..32).map(|j| (j as i8 - 16) as u8));
    assert_eq!(m.to_ggml(), expected);
    let mut row = [0f32; 32];
    m.dequantize_row(0, &mut row).unwrap();
    assert_eq!(&row[..7], &[127.0, -127.0, 1.0, -1.0, 3.0, -3.0, 1.0]);
}

#[test]
fn q4_0_pinned_block() {
    let mut x = [0f32; 32];
    for (j, v) in x.iter_mut().enumerate() {
        *v = 2.0 * (j % 16) as f32 - 16.0;
    }
    x[17] = 3.0; // 3/2 + 8.5 = 10 after truncation: halves round up
    x[18] = -3.0; // -3/2 + 8.5 = 7
                  // The element of largest magnitude is -16 (first at j = 0), so d = -16 / -8 = 2 and q = x/2+8.
    let mut expected = vec![0x00, 0x40];
    expected.extend((0..16u8).map(|m| m | (m << 4)));
    expected[2 + 1] = 0x01 | (10 << 4);
    expected[2 + 2] = 0x02 | (7 << 4);
    let m = QMatrix::quantize(&x, 1, 32, Format::Q4_0).unwrap();
    assert_eq!(m.to_ggml(), expected);
    let mut row = [0f32; 32];
    m.dequantize_row(0, &mut row).unwrap();
    assert_eq!(
        (row[0], row[15], row[17], row[18]),
        (-16.0, 14.0, 4.0, -2.0)
    );

    // With the signs flipped the largest-magnitude element is +16: d = -2 (f16 0xC000) and the
    // nibbles are unchanged. This pins the "max with its sign" convention.
    let neg: Vec<f32> = x.iter().map(|v| -v).collect();
    let m = QMatrix::quantize(&neg, 1, 32, Format::Q4_0).unwrap();
    let mut expected_neg = expected.clone();
    expected_neg[..2].copy_from_slice(&[0x00, 0xC0]);
    assert_eq!(m.to_ggml(), expected_neg);
}

/// Our quantizers are byte-identical to candle's GGML ports (which follow ggml-quants.c).
#[test]
fn blocks_match_candle_ggml() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let (rows, cols) = (37, 1024);
    let w = Rng::new(1).vec(rows * cols);
    for (format, dt) in [
        (Format::Q8_0, GgmlDType::Q8_0),
        (Format::Q4_0, GgmlDType::Q4_0),
    ] {
        let ours = QMatrix::quantize(&w, rows, cols, format).unwrap().to_ggml();
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, dt)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        assert_eq!(ours.len(), theirs.len(), "{format}");
        assert!(ours == theirs, "{format}: blocks differ from candle's");
    }
}

#[test]
fn round_trip_error_bounds() {
    let (rows, cols) = (13, 32 * 37); // 37 blocks: the last group is partial
    let w = Rng::new(2).vec(rows * cols);
    for format in FORMATS {
        let m = QMatrix::quantize(&w, rows, cols, format).unwrap();
        let deq = m.dequantize();
        // dequantize() must agree with an independent decoding of the GGML bytes.
        assert_eq!(deq, decode_ggml(format, &m.to_ggml()), "{format}");
        let mut row = vec![0f32; cols];
        m.dequantize_row(5, &mut row).unwrap();
        assert_eq!(row, &deq[5 * cols..6 * cols]);
        // Per block: Q8_0 is within half a step (plus the f16 rounding of the scale, at most
        // 2^-11 relative on up to 127 steps); Q4_0 within one step (the clamp at +8 moves the
        // far end by up to a step).
        for (xb, qb) in w.chunks_exact(BLOCK).zip(deq.chunks_exact(BLOCK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = match format {
                Format::Q8_0 => amax / 127.0 * (0.5 + 127.0 / 2048.0),
                Format::Q4_0 => amax / 8.0 * (1.0 + 8.0 / 2048.0),
                _ => unreachable!("K-quants are tested in quant_k.rs"),
            } * 1.0001;
            for (&a, &b) in xb.iter().zip(qb) {
                assert!(
                    (a - b).abs() <= bound,
                    "{format}: {a} -> {b}, bound {bound}"
                );
            }
        }
        let err = rel_rms(&deq, &w.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let limit = match format {
            Format::Q8_0 => 0.01,
            Format::Q4_0 => 0.15,
            _ => unreachable!("K-quants are tested in quant_k.rs"),
        };
        assert!(err < limit, "{format}: relative rms error {err}");
    }
}

// ------------------------------------------------------------------------------------------
// Products.

/// matmul (and matvec for t = 1) against references, with the given pool.
fn check_products(rows: usize, cols: usize, t: usize, pool: &Threads, seed: u64) {
    let mut rng = Rng::new(seed);
    let w = rng.vec(rows * cols);
    let x = rng.vec(t * cols);
    for format in FORMATS {
        let m = QMatrix::quantize(&w, rows, cols, format).unwrap();
        let deq = m.dequantize();
        let mut y = vec![f32::NAN; t * rows];
        m.matmul(&x, t, &mut y, pool).unwrap();
        let ctx = format!("{format} {rows}x{cols} t={t} {pool:?}");

        // 1. Tight: exactly the dequantized weights times the quantized activation; only float
        //    rounding (relative to the sum of |terms|) may differ.
        let xq = quantize_activation(&x);
        let exact = reference(&deq, &xq, rows, cols, t);
        let mag = magnitude(&deq, &xq, rows, cols, t);
        for i in 0..t * rows {
            let tol = 2e-6 * mag[i] + 1e-30;
            assert!(
                (y[i] as f64 - exact[i]).abs() <= tol,
                "{ctx}: [{i}] {} vs {} (tol {tol})",
                y[i],
                exact[i]
            );
        }

        // 2. Against the dequantized weights times the f32 activation: bounded by the activation
        //    quantization error, sum |w| * d_x / 2.
        let plain = reference(&deq, &x, rows, cols, t);
        for j in 0..t {
            let xs = &x[j * cols..(j + 1) * cols];
            let half_steps: Vec<f32> = xs
                .chunks_exact(BLOCK)
                .flat_map(|b| {
                    let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    std::iter::repeat_n(d / 2.0, BLOCK)
                })
                .collect();
            for r in 0..rows {
                let bound: f64 = deq[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&half_steps)
                    .map(|(w, h)| (w.abs() * h) as f64)
                    .sum::<f64>()
                    * 1.001
                    + 1e-4 * mag[j * rows + r];
                let e = (y[j * rows + r] as f64 - plain[j * rows + r]).abs();
                assert!(
                    e <= bound,
                    "{ctx}: token {j} row {r}: error {e} > bound {bound}"
                );
            }
        }

        // 3. Loose: against the original f32 weights, relative to the natural scale of a sum of
        //    terms of random sign, sqrt(sum (w x)^2) per output. This is about the relative rms
        //    error of weights and activations together: measured 1.2 % (Q8_0) and 13 % (Q4_0)
        //    on the larger shapes here (the 1-in-97 outliers widen their blocks' steps), up to
        //    4 % for Q8_0 on one-block shapes where few terms average out.
        let full = reference(&w, &x, rows, cols, t);
        let w2: Vec<f32> = w.iter().map(|v| v * v).collect();
        let x2: Vec<f32> = x.iter().map(|v| v * v).collect();
        let scale = reference(&w2, &x2, rows, cols, t);
        let num: f64 = y
            .iter()
            .zip(&full)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum();
        let err = (num / scale.iter().sum::<f64>()).sqrt();
        if std::env::var_os("QUANT_TEST_VERBOSE").is_some() {
            eprintln!("{ctx}: error vs f32 weights {err:.4}");
        }
        let limit = match format {
            Format::Q8_0 => 0.06,
            Format::Q4_0 => 0.2,
            _ => unreachable!("K-quants are tested in quant_k.rs"),
        };
        assert!(err < limit, "{ctx}: relative error vs f32 weights {err}");

        // matvec of each token equals the corresponding matmul row (same kernels, same sums).
        if t > 1 {
            let mut yv = vec![0f32; rows];
            for j in [0, t - 1] {
                m.matvec(&x[j * cols..(j + 1) * cols], &mut yv, pool)
                    .unwrap();
                for r in 0..rows {
                    let tol = 2e-6 * mag[j * rows + r] + 1e-30;
                    assert!(
                        (yv[r] - y[j * rows + r]).abs() as f64 <= tol,
                        "{ctx}: matvec row {r}"
                    );
                }
            }
        }
    }
}

#[test]
fn dot_against_f32() {
    // A single row is a dot product.
    for kernel in Kernel::supported() {
        check_products(1, 4096, 1, &threads(1, kernel), 3);
    }
}

#[test]
fn matvec_every_kernel() {
    for kernel in Kernel::supported() {
        for n in [1, 2] {
            // 600 x 1056: parallel (above the serial threshold), rows not a multiple of the
            // 4-row tile or of the thread count, a partial last group.
            check_products(600, 1056, 1, &threads(n, kernel), 4);
            check_products(7, 64, 1, &threads(n, kernel), 5);
        }
    }
}

#[test]
fn matmul_every_kernel_odd_shapes() {
    for kernel in Kernel::supported() {
        let pool2 = threads(2, kernel);
        let pool3 = threads(3, kernel);
        for t in [2, 3, 17] {
            check_products(133, 544, t, &pool2, 6 + t as u64);
        }
        check_products(1, 32, 3, &pool3, 7);
        check_products(5, 96, 5, &pool3, 8);
        check_products(517, 512, 4, &pool3, 9);
    }
}

#[test]
fn large_batch() {
    // More tokens than one cache tile and more columns than one reduction slice (2048), with the
    // best kernel.
    let pool = Threads::new(2).unwrap();
    check_products(70, 2592, 150, &pool, 10);
}

/// Every kernel gives the same result as the scalar one up to float summation order.
#[test]
fn kernels_agree() {
    // 2592 columns: several reduction slices, the last one partial, the last group partial.
    let (rows, cols, t) = (301, 2592, 19);
    let mut rng = Rng::new(11);
    let w = rng.vec(rows * cols);
    let x = rng.vec(t * cols);
    for format in FORMATS {
        let m = QMatrix::quantize(&w, rows, cols, format).unwrap();
        let mag = magnitude(&m.dequantize(), &x, rows, cols, t);
        let mut want = vec![0f32; t * rows];
        m.matmul(&x, t, &mut want, &threads(1, Kernel::Scalar))
            .unwrap();
        for kernel in Kernel::supported() {
            for n in [1, 2] {
                let mut y = vec![0f32; t * rows];
                m.matmul(&x, t, &mut y, &threads(n, kernel)).unwrap();
                for i in 0..t * rows {
                    let tol = 2e-6 * mag[i];
                    assert!(
                        ((y[i] - want[i]).abs() as f64) <= tol,
                        "{format} {kernel} x{n}: [{i}] {} vs scalar {}",
                        y[i],
                        want[i]
                    );
                }
            }
        }
    }
}

#[test]
fn zero_input_gives_zero() {
    let pool = Threads::new(2).unwrap();
    let w = Rng::new(12).vec(64 * 512);
    for format in FORMATS {
        let m = QMatrix::quantize(&w, 64, 512, format).unwrap();
        let mut y = vec![1f32; 64];
        m.matvec(&[0f32; 512], &mut y, &pool).unwrap();
        assert!(y.iter().all(|&v| v == 0.0), "{format}");
        let z = QMatrix::quantize(&[0f32; 64 * 512], 64, 512, format).unwrap();
        z.matvec(&w[..512], &mut y, &pool).unwrap();
        assert!(y.iter().all(|&v| v == 0.0), "{format}");
    }
}

#[test]
fn unsupported_kernel_is_an_error() {
    for kernel in Kernel::ALL {
        assert_eq!(
            Threads::with_kernel(1, kernel).is_ok(),
            kernel.is_supported()
        );
    }
    assert!(Kernel::Scalar.is_supported());
    assert!(Threads::new(0).is_err());
}

// ------------------------------------------------------------------------------------------
// Bad input and serialization.

#[test]
fn bad_shapes_are_errors() {
    let pool = Threads::new(1).unwrap();
    for format in FORMATS {
        assert!(QMatrix::quantize(&[0.0; 48], 1, 48, format).is_err());
        assert!(QMatrix::quantize(&[0.0; 64], 1, 32, format).is_err());
        assert!(QMatrix::quantize(&[], 0, 32, format).is_err());
        assert!(QMatrix::quantize(&[], usize::MAX / 16, 64, format).is_err());
        assert!(QMatrix::from_ggml(2, 64, format, &[0; 10]).is_err());
        let m = QMatrix::quantize(&[0.5; 3 * 64], 3, 64, format).unwrap();
        let mut y = [0f32; 3];
        assert!(m.matvec(&[0.0; 63], &mut y, &pool).is_err());
        assert!(m.matvec(&[0.0; 64], &mut y[..2], &pool).is_err());
        assert!(m.matmul(&[0.0; 128], 2, &mut [0.0; 5], &pool).is_err());
        assert!(m.matmul(&[0.0; 128], 3, &mut [0.0; 9], &pool).is_err());
        assert!(m.matmul(&[], usize::MAX, &mut [], &pool).is_err());
        assert!(m.matmul(&[], 0, &mut [], &pool).is_ok());
        assert!(m.dequantize_row(3, &mut [0.0; 64]).is_err());
        assert!(m.dequantize_row(0, &mut [0.0; 32]).is_err());
    }
}

#[test]
fn serialization_round_trip_and_truncation() {
    let w = Rng::new(13).vec(3 * 96);
    for format in FORMATS {
        let m = QMatrix::quantize(&w, 3, 96, format).unwrap();
        let bytes = m.to_bytes();
        assert_eq!(bytes.len(), 32 + 3 * 3 * format.block_bytes());
        assert_eq!(&bytes[32..], &m.to_ggml()[..]);
        let back = QMatrix::from_bytes(&bytes).unwrap();
        assert_eq!((back.rows(), back.cols(), back.format()), (3, 96, format));
        assert_eq!(back.to_ggml(), m.to_ggml());
        assert_eq!(back.dequantize(), m.dequantize());
        let g = QMatrix::from_ggml(3, 96, format, &m.to_ggml()).unwrap();
        assert_eq!(g.dequantize(), m.dequantize());

        for len in 0..bytes.len() {
            assert!(
                QMatrix::from_bytes(&bytes[..len]).is_err(),
                "{format}: prefix {len}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(QMatrix::from_bytes(&long).is_err());
        let corrupt = |at: usize, val: u8| {
            let mut b = bytes.clone();
            b[at] = val;
            QMatrix::from_bytes(&b)
        };
        assert!(corrupt(0, b'X').is_err(), "magic");
        assert!(corrupt(4, 2).is_err(), "version");
        assert!(corrupt(8, 1).is_err(), "type");
        assert!(corrupt(24, 97).is_err(), "cols not a multiple of 32");
        assert!(corrupt(16, 4).is_err(), "rows disagree with the length");
        assert!(corrupt(23, 0xFF).is_err(), "absurd rows");
        assert!(corrupt(31, 0xFF).is_err(), "absurd cols");
    }
}

// ------------------------------------------------------------------------------------------
// Thread pool.

#[test]
fn pool_runs_every_index_once() {
    for n in [1, 2, 3, 5] {
        let pool = Threads::new(n).unwrap();
        assert_eq!(pool.len(), n);
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..2000 {
            pool.run(|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(
            hits.iter().all(|h| h.load(Ordering::Relaxed) == 2000),
            "n = {n}"
        );
    }
}

#[test]
fn pool_parks_and_wakes() {
    let pool = Threads::new(2).unwrap();
    pool.set_spin(Duration::ZERO);
    let total = AtomicUsize::new(0);
    for k in 0..200 {
        if k % 50 == 0 {
            // Give the worker time to park for real.
            std::thread::sleep(Duration::from_millis(2));
        }
        pool.run(|i| {
            total.fetch_add(i + 1, Ordering::Relaxed);
        });
    }
    assert_eq!(total.load(Ordering::Relaxed), 200 * 3);
}

#[test]
fn pool_is_shared_between_threads() {
    // Two callers on one pool take turns; both get correct results.
    let pool = Threads::new(2).unwrap();
    let w = Rng::new(14).vec(256 * 1024);
    let m = QMatrix::quantize(&w, 256, 1024, Format::Q8_0).unwrap();
    let x = Rng::new(15).vec(1024);
    let mut want = vec![0f32; 256];
    m.matvec(&x, &mut want, &pool).unwrap();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut y = vec![0f32; 256];
                for _ in 0..200 {
                    m.matvec(&x, &mut y, &pool).unwrap();
                    assert_eq!(y, want);
                }
            });
        }
    });
}
