//! The K-quant formats (Q4_K, Q6_K) of `lfm2_audio::quant`: byte-identity with ggml's own
//! quantizers (a fixture written by ggml, see `tools/ggml_kquant_fixture.py`), the activation
//! blocks against ggml's Q8_K, bit-identical results from every kernel, and error bounds.

use lfm2_audio::quant::{Format, Kernel, QMatrix, Threads, QK_K};

const K_FORMATS: [Format; 2] = [Format::Q4_K, Format::Q6_K];

/// The fixture: inputs and the bytes ggml's `quantize_row_{q4_K,q6_K,q8_K}_ref` made of them.
struct Fixture {
    rows: usize,
    cols: usize,
    x: Vec<f32>,
    q4k: Vec<u8>,
    q6k: Vec<u8>,
    q8k: Vec<u8>,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ggml_kquants.bin");
    let b = std::fs::read(path).expect("fixture");
    assert_eq!(&b[..4], b"GKQ1");
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let (rows, cols) = (u32_at(4), u32_at(8));
    let n = rows * cols;
    let mut o = 12;
    let x: Vec<f32> = b[o..o + 4 * n]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    o += 4 * n;
    let mut take = |bytes: usize| {
        let len = n / QK_K * bytes;
        let v = b[o..o + len].to_vec();
        o += len;
        v
    };
    let q4k = take(144);
    let q6k = take(210);
    let q8k = take(292);
    assert_eq!(o, b.len(), "fixture size");
    Fixture {
        rows,
        cols,
        x,
        q4k,
        q6k,
        q8k,
    }
}

fn f16(b: &[u8], o: usize) -> f32 {
    half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Decodes GGML K-quant blocks independently of the library (as ggml's dequantize_row_*).
fn decode_ggml(format: Format, data: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for blk in data.chunks_exact(format.block_bytes()) {
        match format {
            Format::Q4_K => {
                let (d, dmin) = (f16(blk, 0), f16(blk, 2));
                let sc = &blk[4..16];
                let get = |j: usize| -> (f32, f32) {
                    let (s, m) = if j < 4 {
                        (sc[j] & 63, sc[j + 4] & 63)
                    } else {
                        (
                            (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                        )
                    };
                    (d * s as f32, dmin * m as f32)
                };
                for c in 0..4 {
                    let q = &blk[16 + 32 * c..48 + 32 * c];
                    let (d1, m1) = get(2 * c);
                    out.extend(q.iter().map(|&v| d1 * (v & 0xF) as f32 - m1));
                    let (d2, m2) = get(2 * c + 1);
                    out.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - m2));
                }
            }
            Format::Q6_K => {
                let d = f16(blk, 208);
                let mut vals = [0f32; 256];
                for h in 0..2 {
                    let (ql, qh) = (&blk[64 * h..64 * h + 64], &blk[128 + 32 * h..160 + 32 * h]);
                    for l in 0..32 {
                        let q = [
                            (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (k, &q) in q.iter().enumerate() {
                            let v = 128 * h + l + 32 * k;
                            let sc = blk[192 + v / 16] as i8 as f32;
                            vals[v] = d * sc * (q as i32 - 32) as f32;
                        }
                    }
                }
                out.extend_from_slice(&vals);
            }
            _ => unreachable!(),
        }
    }
    out
}

/// ggml's Q8_K blocks decoded: `d * q` per value.
fn decode_q8k(data: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    for blk in data.chunks_exact(292) {
        let d = f32::from_le_bytes(blk[..4].try_into().unwrap());
        out.extend(blk[4..260].iter().map(|&q| d * (q as i8) as f32));
        // The 16 sums are of the quants, as ggml defines them.
        for j in 0..16 {
            let s: i32 = blk[4 + 16 * j..20 + 16 * j]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            let o = 260 + 2 * j;
            assert_eq!(s as i16, i16::from_le_bytes([blk[o], blk[o + 1]]));
        }
    }
    out
}

fn threads(n: usize, kernel: Kernel) -> Threads {
    Threads::with_kernel(n, kernel).expect("kernel supported")
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
        let v = (u - 0.5) * 2.0;
        if (self.0 >> 7).is_multiple_of(61) {
            v * 6.0
        } else {
            v
        }
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

#[test]
fn quantizers_are_byte_identical_to_ggml() {
    let f = fixture();
    for (format, theirs) in [(Format::Q4_K, &f.q4k), (Format::Q6_K, &f.q6k)] {
        let m = QMatrix::quantize(&f.x, f.rows, f.cols, format).unwrap();
        let ours = m.to_ggml();
        assert_eq!(ours.len(), theirs.len(), "{format}");
        let bb = format.block_bytes();
        for (i, (a, b)) in ours.chunks(bb).zip(theirs.chunks(bb)).enumerate() {
            assert_eq!(
                a,
                b,
                "{format}: super-block {i} (row {}) differs from ggml's",
                i / (f.cols / QK_K)
            );
        }
        // Dequantizing agrees with an independent decoding of the same bytes.
        assert_eq!(m.dequantize(), decode_ggml(format, theirs), "{format}");
        // GGML blocks go in and come out unchanged.
        let back = QMatrix::from_ggml(f.rows, f.cols, format, theirs).unwrap();
        assert!(back.to_ggml() == *theirs, "{format}: from_ggml round trip");
    }
}

/// The products use ggml's Q8_K activation blocks: with the fixture's rows as activations, every
/// kernel's result is the dequantized weights times ggml's dequantized Q8_K values, up to f32
/// rounding.
#[test]
fn activations_are_ggml_q8_k() {
    let f = fixture();
    let xq = decode_q8k(&f.q8k);
    for format in K_FORMATS {
        let m = QMatrix::quantize(&f.x, f.rows, f.cols, format).unwrap();
        let w = m.dequantize();
        for kernel in Kernel::supported() {
            let pool = threads(1, kernel);
            // Token j = fixture row j (the fixture holds rows * cols values, as many tokens).
            let mut y = vec![0f32; f.rows * f.rows];
            m.matmul(&f.x, f.rows, &mut y, &pool).unwrap();
            for j in 0..f.rows {
                let x = &xq[j * f.cols..(j + 1) * f.cols];
                for r in 0..f.rows {
                    let wr = &w[r * f.cols..(r + 1) * f.cols];
                    let exact: f64 = wr.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mag: f64 = wr.iter().zip(x).map(|(&a, &b)| (a * b).abs() as f64).sum();
                    let got = y[j * f.rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * mag + 1e-30,
                        "{format} {kernel}: token {j} row {r}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}

/// Every kernel, on 1 and 2 threads, for decode and prefill, gives exactly the scalar kernel's
/// bits (same integer sums, same f32 operations per super-block in the same order).
#[test]
fn kernels_are_bit_identical_to_scalar() {
    let (rows, cols, t) = (301, 2048, 19);
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let w = rng.vec(rows * cols);
    let x = rng.vec(t * cols);
    for format in K_FORMATS {
        let m = QMatrix::quantize(&w, rows, cols, format).unwrap();
        let mut want = vec![0f32; t * rows];
        m.matmul(&x, t, &mut want, &threads(1, Kernel::Scalar))
            .unwrap();
        let mut want1 = vec![0f32; rows];
        m.matvec(&x[..cols], &mut want1, &threads(1, Kernel::Scalar))
            .unwrap();
        assert_eq!(
            want1,
            want[..rows],
            "{format}: matvec = matmul's first token"
        );
        for kernel in Kernel::supported() {
            for n in [1, 2] {
                let pool = threads(n, kernel);
                let mut y = vec![0f32; t * rows];
                m.matmul(&x, t, &mut y, &pool).unwrap();
                assert!(
                    y == want,
                    "{format} {kernel} x{n}: matmul differs from scalar"
                );
                let mut y1 = vec![0f32; rows];
                m.matvec(&x[..cols], &mut y1, &pool).unwrap();
                assert!(
                    y1 == want1,
                    "{format} {kernel} x{n}: matvec differs from scalar"
                );
                // Fused products give each matrix's own result.
                let m2 = QMatrix::quantize(&w[..64 * cols], 64, cols, format).unwrap();
                let (mut a, mut b) = (vec![0f32; rows], vec![0f32; 64]);
                QMatrix::matvec_many(&[&m, &m2], &x[..cols], &mut [&mut a, &mut b], &pool).unwrap();
                assert!(a == want1, "{format} {kernel} x{n}: matvec_many");
                let mut b1 = vec![0f32; 64];
                m2.matvec(&x[..cols], &mut b1, &pool).unwrap();
                assert!(
                    b == b1,
                    "{format} {kernel} x{n}: matvec_many, second matrix"
                );
            }
        }
    }
}

/// Against f32 weights: Q6_K is close, Q4_K at least as good as Q4_0.
#[test]
fn error_against_f32() {
    let (rows, cols) = (64, 2048);
    let mut rng = Rng(0x0DDB_A11C_0FFE_E001);
    let w = rng.vec(rows * cols);
    let x = rng.vec(cols);
    let exact: Vec<f64> = (0..rows)
        .map(|r| {
            (0..cols)
                .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                .sum()
        })
        .collect();
    let scale: f64 = (0..rows)
        .map(|r| {
            (0..cols)
                .map(|c| (w[r * cols + c] as f64 * x[c] as f64).powi(2))
                .sum::<f64>()
        })
        .sum();
    let pool = Threads::new(2).unwrap();
    let err = |format: Format| {
        let m = QMatrix::quantize(&w, rows, cols, format).unwrap();
        let mut y = vec![0f32; rows];
        m.matvec(&x, &mut y, &pool).unwrap();
        let num: f64 = y
            .iter()
            .zip(&exact)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum();
        (num / scale).sqrt()
    };
    let (q4_0, q4k, q6k, q8_0) = (
        err(Format::Q4_0),
        err(Format::Q4_K),
        err(Format::Q6_K),
        err(Format::Q8_0),
    );
    eprintln!("relative error: Q4_0 {q4_0:.4}, Q4_K {q4k:.4}, Q6_K {q6k:.4}, Q8_0 {q8_0:.4}");
    assert!(q4k < q4_0, "Q4_K {q4k} vs Q4_0 {q4_0}");
    assert!(q6k < q4k / 2.0, "Q6_K {q6k} vs Q4_K {q4k}");
    assert!(q6k < 0.05, "Q6_K {q6k}");
}

#[test]
fn shapes_and_serialization() {
    let mut rng = Rng(7);
    let w = rng.vec(3 * 512);
    for format in K_FORMATS {
        // Rows must be whole super-blocks.
        let err = QMatrix::quantize(&w[..3 * 480], 3, 480, format)
            .unwrap_err()
            .to_string();
        assert!(err.contains("256"), "{err}");
        assert!(QMatrix::from_ggml(3, 512, format, &[0; 10]).is_err());
        let m = QMatrix::quantize(&w, 3, 512, format).unwrap();
        assert_eq!(m.ggml_bytes(), 3 * 2 * format.block_bytes());
        let bytes = m.to_bytes();
        let back = QMatrix::from_bytes(&bytes).unwrap();
        assert_eq!(back.format(), format);
        assert!(back.to_ggml() == m.to_ggml());
        assert!(QMatrix::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        // An all-zero input gives zero blocks and zero products.
        let z = QMatrix::quantize(&[0f32; 512], 1, 512, format).unwrap();
        assert!(z.dequantize().iter().all(|&v| v == 0.0));
        let mut y = [1f32; 3];
        m.matvec(&[0f32; 512], &mut y, &Threads::new(1).unwrap())
            .unwrap();
        assert_eq!(y, [0.0; 3]);
    }
}

/// The mixed plans give each decode role its format, by tensor name, and fall back to a
/// 32-value format for rows that are not whole super-blocks.
#[test]
fn plans_choose_formats_by_role() {
    use lfm2_audio::weights::{DecodeRole, QuantPlan, WeightClass};
    use std::sync::Arc;
    let roles = [
        (
            "lfm.layers.0.feed_forward.w1.weight",
            DecodeRole::FeedForward,
        ),
        ("lfm.layers.2.self_attn.q_proj.weight", DecodeRole::Operator),
        ("lfm.layers.0.conv.in_proj.weight", DecodeRole::Operator),
        ("lfm.embed_tokens.weight", DecodeRole::Head),
        (
            "depthformer.layers.3.feed_forward.w2.weight",
            DecodeRole::Depth,
        ),
        ("depth_linear.weight", DecodeRole::Depth),
        ("depth_embeddings.4.embedding.weight", DecodeRole::Depth),
    ];
    for (name, role) in roles {
        assert_eq!(DecodeRole::of(name), role, "{name}");
    }
    let plan = QuantPlan::mixed(
        Format::Q4_K,
        &[(DecodeRole::Operator, Format::Q6_K)],
        Format::Q8_0,
        Arc::new(Threads::new(1).unwrap()),
    );
    let d = WeightClass::Decode;
    let ffn = "lfm.layers.0.feed_forward.w1.weight";
    let attn = "lfm.layers.2.self_attn.q_proj.weight";
    assert_eq!(plan.format_of(ffn, d, 2048), Some(Format::Q4_K));
    assert_eq!(plan.format_of(attn, d, 2048), Some(Format::Q6_K));
    assert_eq!(plan.format_of(ffn, d, 2048 + 32), Some(Format::Q4_0));
    assert_eq!(plan.format_of(attn, d, 2048 + 32), Some(Format::Q8_0));
    assert_eq!(
        plan.format_of(ffn, WeightClass::Auxiliary, 2048),
        Some(Format::Q8_0)
    );
    assert_eq!(QuantPlan::f32().format_of(ffn, d, 2048), None);
}
