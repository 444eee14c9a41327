//! Linear maps and embedding tables, with their weights in f32 or block-quantized as the
//! [`QuantPlan`](crate::weights::QuantPlan) says. A table can also serve as the weight of a linear
//! map (a tied output head).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::ops::with_f32_slice;
use crate::quant::{Format, QMatrix, Reread, Threads};
use crate::weights::{Matrix, WeightClass, Weights};

/// A linear map `y = x·Wᵀ (+ b)` with `W` stored `[out, in]` as in the checkpoint, either in f32
/// (the exact path) or block-quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantized {
        q: Arc<QMatrix>,
        threads: Arc<Threads>,
    },
}

impl Linear {
    /// Loads `{name}.weight` (and `{name}.bias`) as a [`WeightClass::Decode`] matrix.
    pub fn load(
        w: &Weights,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        Self::load_class(w, name, out_dim, in_dim, bias, WeightClass::Decode)
    }

    /// Loads a linear map stored in the format the plan gives `class`.
    pub fn load_class(
        w: &Weights,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        class: WeightClass,
    ) -> Result<Self> {
        let wname = format!("{name}.weight");
        let bias = if bias {
            Some(w.get(&format!("{name}.bias"), &[out_dim])?)
        } else {
            None
        };
        Self::from_matrix(w, &wname, out_dim, in_dim, bias, class, || {
            w.get(&wname, &[out_dim, in_dim])
        })
    }

    /// A linear map of the `[out, in]` weight that `load` gives (for weights stored in another
    /// shape or shared with another tensor), quantized as the plan says; `name` identifies it
    /// in the quantization cache.
    pub fn from_matrix(
        w: &Weights,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        bias: Option<Tensor>,
        class: WeightClass,
        load: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Self> {
        let weight = match w.matrix(name, out_dim, in_dim, class, load)? {
            Matrix::Dense(t) => Weight::Dense(t),
            Matrix::Quantized(q) => {
                let threads =
                    w.plan().threads.clone().ok_or_else(|| {
                        Error::Invalid("quantized weights need a thread pool".into())
                    })?;
                Weight::Quantized {
                    q: Arc::new(q),
                    threads,
                }
            }
        };
        Ok(Self { weight, bias })
    }

    /// An f32 linear map.
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Dense(w) => w.dims2().unwrap_or((0, 0)),
            Weight::Quantized { q, .. } => (q.rows(), q.cols()),
        }
    }

    /// The storage format (`None` for f32).
    pub fn format(&self) -> Option<Format> {
        match &self.weight {
            Weight::Dense(_) => None,
            Weight::Quantized { q, .. } => Some(q.format()),
        }
    }

    /// The thread pool a quantized weight's products run on (none for f32 weights).
    pub fn pool(&self) -> Option<&Threads> {
        match &self.weight {
            Weight::Dense(_) => None,
            Weight::Quantized { threads, .. } => Some(threads),
        }
    }

    /// Tells a quantized weight's products how often it is read again soon ([`Reread`]; a
    /// prefetching hint, same numbers either way). Nothing for an f32 weight.
    pub fn set_reread(&mut self, reread: Reread) {
        if let Weight::Quantized { q, .. } = &mut self.weight {
            if q.reread() != reread {
                // Copies the matrix only if another map still shares it.
                Arc::make_mut(q).set_reread(reread);
            }
        }
    }

    /// Bytes the weight occupies.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * 4,
            Weight::Quantized { q, .. } => q.ggml_bytes(),
        }
    }

    /// `x · Wᵀ (+ b)` for `x` of shape `[T, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => x.matmul(&w.t()?)?,
            Weight::Quantized { q, threads } => {
                let (t, k) = x.dims2()?;
                let x = x.contiguous()?;
                let mut y = vec![0f32; t * q.rows()];
                with_f32_slice(&x, |xs| {
                    if t == 1 {
                        q.matvec(xs, &mut y, threads)
                    } else {
                        q.matmul(xs, t, &mut y, threads)
                    }
                })?;
                debug_assert_eq!(k, q.cols());
                Tensor::from_vec(y, (t, q.rows()), &Device::Cpu)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `y = W x (+ b)` for one position given as a slice (`x`: `in` values, `y`: `out`
    /// values). Quantized weights run the pool's matrix-vector kernel straight on the slices;
    /// f32 weights go through the same matrix product as [`Linear::forward`], so the exact path
    /// gives the same numbers either way.
    pub fn forward_vec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        match &self.weight {
            Weight::Dense(w) => {
                let xt = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
                let yt = xt.matmul(&w.t()?)?;
                with_f32_slice(&yt, |ys| {
                    if ys.len() != y.len() {
                        return Err(Error::Invalid(format!(
                            "linear map to {} values into {} values",
                            ys.len(),
                            y.len()
                        )));
                    }
                    y.copy_from_slice(ys);
                    Ok(())
                })?;
            }
            Weight::Quantized { q, threads } => q.matvec(x, y, threads)?,
        }
        if let Some(b) = &self.bias {
            with_f32_slice(b, |b| {
                crate::ops::add_assign(y, b);
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// Several linear maps of the same input (`ys[i] = maps[i] x`). Quantized maps of one format
/// and pool share one quantization of `x` and one fork/join of the pool
/// ([`QMatrix::matvec_many`]); anything else runs map by map. Same numbers either way.
pub fn forward_vec_many(maps: &[&Linear], x: &[f32], ys: &mut [&mut [f32]]) -> Result<()> {
    let mut qs = Vec::with_capacity(maps.len());
    let mut pool: Option<&Arc<Threads>> = None;
    for m in maps {
        match (&m.weight, &m.bias) {
            (Weight::Quantized { q, threads }, None)
                if pool.is_none_or(|p| Arc::ptr_eq(p, threads))
                    && qs.first().is_none_or(|f: &&QMatrix| {
                        f.cols() == q.cols() && f.format() == q.format()
                    }) =>
            {
                pool = Some(threads);
                qs.push(&**q);
            }
            _ => break,
        }
    }
    match pool {
        Some(threads) if qs.len() == maps.len() => QMatrix::matvec_many(&qs, x, ys, threads),
        _ => {
            for (m, y) in maps.iter().zip(ys.iter_mut()) {
                m.forward_vec(x, y)?;
            }
            Ok(())
        }
    }
}

/// A table of rows looked up by index (token or code embeddings), in f32 or block-quantized.
#[derive(Debug, Clone)]
pub enum Table {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
}

impl Table {
    /// Loads a `[rows, dim]` table, stored in the format the plan gives `class`.
    pub fn load(
        w: &Weights,
        name: &str,
        rows: usize,
        dim: usize,
        class: WeightClass,
    ) -> Result<Self> {
        Ok(
            match w.matrix(name, rows, dim, class, || w.get(name, &[rows, dim]))? {
                Matrix::Dense(t) => Table::Dense(t),
                Matrix::Quantized(q) => Table::Quantized(Arc::new(q)),
            },
        )
    }

    pub fn rows(&self) -> usize {
        match self {
            Table::Dense(t) => t.dims()[0],
            Table::Quantized(q) => q.rows(),
        }
    }

    pub fn dim(&self) -> usize {
        match self {
            Table::Dense(t) => t.dims().get(1).copied().unwrap_or(0),
            Table::Quantized(q) => q.cols(),
        }
    }

    /// Rows `ids` as `[ids.len(), dim]`. Ids must be below `rows()`.
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.rows()) {
            return Err(Error::Invalid(format!(
                "row {bad} is outside a table of {} rows",
                self.rows()
            )));
        }
        match self {
            Table::Dense(t) => Ok(t.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?),
            Table::Quantized(q) => {
                let dim = q.cols();
                let mut out = vec![0f32; ids.len() * dim];
                for (row, &id) in out.chunks_mut(dim).zip(ids) {
                    q.dequantize_row(id as usize, row)?;
                }
                Ok(Tensor::from_vec(out, (ids.len(), dim), &Device::Cpu)?)
            }
        }
    }

    /// Copies row `id` into `out` (`dim` values).
    pub fn row_into(&self, id: u32, out: &mut [f32]) -> Result<()> {
        let (rows, dim) = (self.rows(), self.dim());
        if id as usize >= rows || out.len() != dim {
            return Err(Error::Invalid(format!(
                "row {id} of {} values from a table of {rows} rows of {dim}",
                out.len()
            )));
        }
        match self {
            Table::Dense(t) => with_f32_slice(t, |data| {
                out.copy_from_slice(&data[id as usize * dim..(id as usize + 1) * dim]);
                Ok(())
            }),
            Table::Quantized(q) => q.dequantize_row(id as usize, out),
        }
    }

    /// Bytes the table occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Table::Dense(t) => t.elem_count() * 4,
            Table::Quantized(q) => q.ggml_bytes(),
        }
    }

    /// The table used as the weight of a linear map (a tied output head).
    pub fn as_linear(&self, threads: Option<&Arc<Threads>>) -> Linear {
        match (self, threads) {
            (Table::Quantized(q), Some(threads)) => Linear {
                weight: Weight::Quantized {
                    q: Arc::clone(q),
                    threads: Arc::clone(threads),
                },
                bias: None,
            },
            (Table::Quantized(q), None) => Linear::from_weight(
                Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)
                    .unwrap_or_else(|_| {
                        Tensor::zeros((0, 0), DType::F32, &Device::Cpu).expect("empty tensor")
                    }),
                None,
            ),
            (Table::Dense(t), _) => Linear::from_weight(t.clone(), None),
        }
    }
}
