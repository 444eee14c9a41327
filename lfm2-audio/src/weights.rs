//! Reading tensors from a safetensors checkpoint with errors that name the file and the tensor.
//!
//! The file is memory-mapped and its header parsed once; tensors are converted to f32 (the
//! compute dtype) when they are taken. F32, BF16 and F16 storage is accepted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;

use crate::error::{Error, Result};
use crate::quant::{Format, QMatrix, Threads, BLOCK};

/// Matrices smaller than this stay in f32: quantizing them saves nothing worth the precision.
pub const MIN_QUANT_ELEMENTS: usize = 1 << 14;

/// Which weights a matrix belongs to, for choosing its storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightClass {
    /// Read on every decode step: backbone, text head, depthformer, depth_linear.
    Decode,
    /// Encoder, adapter, detokenizer and embedding tables: run once per utterance or frame, or
    /// only looked up, and more sensitive to precision.
    Auxiliary,
}

/// How large matrices are stored after loading.
#[derive(Debug, Clone, Default)]
pub struct QuantPlan {
    /// Format of [`WeightClass::Decode`] matrices (`None`: f32).
    pub decode: Option<Format>,
    /// Format of [`WeightClass::Auxiliary`] matrices (`None`: f32).
    pub auxiliary: Option<Format>,
    /// The thread pool quantized products run on.
    pub threads: Option<Arc<Threads>>,
}

impl QuantPlan {
    /// f32 everywhere: the exact path.
    pub fn f32() -> Self {
        Self::default()
    }

    /// `format` for the decode weights; Q8_0 for the auxiliary ones unless `format` is wider.
    pub fn with_format(format: Format, threads: Arc<Threads>) -> Self {
        Self {
            decode: Some(format),
            auxiliary: Some(Format::Q8_0),
            threads: Some(threads),
        }
    }

    pub fn format(&self, class: WeightClass) -> Option<Format> {
        match class {
            WeightClass::Decode => self.decode,
            WeightClass::Auxiliary => self.auxiliary,
        }
    }
}

/// A weight matrix as the plan stores it.
pub enum Matrix {
    Dense(Tensor),
    Quantized(QMatrix),
}

/// An open safetensors file.
pub struct Weights {
    path: PathBuf,
    // `tensors` borrows from `mmap`; the map lives as long as `self` and is never moved out.
    tensors: SafeTensors<'static>,
    mmap: memmap2::Mmap,
    plan: QuantPlan,
    /// Matrices quantized earlier, read from the cache file next to the model.
    cache: Option<QuantCache>,
    /// When there is no valid cache: the new one, written matrix by matrix during this load.
    writer: RefCell<Option<CacheWriter>>,
}

impl Weights {
    /// Opens and validates the header of a safetensors file. A truncated or corrupt file is an
    /// error here, before any tensor is read.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingFile {
                path: path.to_owned(),
                what: "model weights",
            },
            _ => Error::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        // SAFETY: the map is read-only; a file changed by another process while mapped is outside
        // what the loader can defend against, as for every memory-mapped loader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        // SAFETY: the slice points into `mmap`, which is stored next to the parsed view and
        // outlives it; the 'static lifetime never escapes this struct.
        let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(mmap.as_ptr(), mmap.len()) };
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
            path: path.to_owned(),
            message: describe_safetensors_error(&e, mmap.len()),
        })?;
        Ok(Self {
            path: path.to_owned(),
            tensors,
            mmap,
            plan: QuantPlan::default(),
            cache: None,
            writer: RefCell::new(None),
        })
    }

    /// Sets how large matrices are stored when they are loaded. With quantization, matrices
    /// quantized by an earlier load are read from the cache file next to the model, if it is
    /// there and belongs to this very file and plan.
    pub fn with_plan(mut self, plan: QuantPlan) -> Self {
        if let Some(path) = self.cache_path(&plan) {
            let key = self.cache_key(&plan);
            self.cache = QuantCache::open(&path, &key);
            if self.cache.is_none() {
                // A directory we cannot write to only means quantizing again next time.
                *self.writer.get_mut() = CacheWriter::create(&path, &key).ok();
            }
        }
        self.plan = plan;
        self
    }

    /// The weight `name` (`rows × cols`) stored for `class`: quantized when the plan says so and
    /// the shape allows it, from the cache when it is there; otherwise the f32 tensor `load`
    /// gives.
    pub fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        class: WeightClass,
        load: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Matrix> {
        let format = match self.plan.format(class) {
            Some(f)
                if cols.is_multiple_of(BLOCK)
                    && rows * cols >= MIN_QUANT_ELEMENTS
                    && self.plan.threads.is_some() =>
            {
                f
            }
            _ => return Ok(Matrix::Dense(load()?)),
        };
        let key = format!("{name}@{}", format.name());
        if let Some(q) = self.cache.as_ref().and_then(|c| c.get(&key)) {
            if q.rows() == rows && q.cols() == cols && q.format() == format {
                return Ok(Matrix::Quantized(q));
            }
        }
        let t = load()?.contiguous()?;
        let q = crate::ops::with_f32_slice(&t, |data| QMatrix::quantize(data, rows, cols, format))?;
        drop(t);
        let mut writer = self.writer.borrow_mut();
        if let Some(w) = writer.as_mut() {
            if w.add(&key, &q.to_bytes()).is_err() {
                // A full disk only means no cache: drop the half-written file.
                writer.take();
            }
        }
        Ok(Matrix::Quantized(q))
    }

    /// Completes the cache written during this load (when there was none), so that the next
    /// load of this file with this plan skips quantization. Returns where it was written.
    pub fn save_cache(&self) -> Result<Option<PathBuf>> {
        match self.writer.borrow_mut().take() {
            Some(w) => w.finish().map(Some),
            None => Ok(None),
        }
    }

    /// `<dir>/.lfm2d-cache/<file>.qcache` next to the model, when the plan quantizes anything.
    fn cache_path(&self, plan: &QuantPlan) -> Option<PathBuf> {
        if plan.decode.is_none() && plan.auxiliary.is_none() {
            return None;
        }
        let dir = self.path.parent()?.join(".lfm2d-cache");
        let stem = self.path.file_stem()?.to_string_lossy();
        Some(dir.join(format!("{stem}.qcache")))
    }

    /// What a cache must have been made from: this file (size and modification time), the plan,
    /// and the quantizer's version.
    fn cache_key(&self, plan: &QuantPlan) -> String {
        let meta = std::fs::metadata(&self.path).ok();
        let mtime = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        format!(
            "v1 size={} mtime={} decode={:?} aux={:?}",
            meta.map(|m| m.len()).unwrap_or(0),
            mtime.map(|d| d.as_nanos()).unwrap_or(0),
            plan.decode,
            plan.auxiliary
        )
    }

    pub fn plan(&self) -> &QuantPlan {
        &self.plan
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.tensor(name).is_ok()
    }

    /// All tensor names in the file.
    pub fn names(&self) -> Vec<String> {
        self.tensors
            .names()
            .into_iter()
            .map(|s| s.to_owned())
            .collect()
    }

    /// The stored shape of a tensor, or a `MissingTensor` error.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.shape().to_vec())
    }

    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.tensors.tensor(name).map_err(|_| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_owned(),
        })
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let view = self.view(name)?;
        if view.shape() != shape {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                name: name.to_owned(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        self.to_f32(name, &view)
    }

    /// Reads a tensor as f32 whatever its shape (for tensors whose shape defines the model).
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let view = self.view(name)?;
        self.to_f32(name, &view)
    }

    fn to_f32(&self, name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => {
                return Err(Error::TensorDtype {
                    path: self.path.clone(),
                    name: name.to_owned(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?
            .to_dtype(DType::F32)?;
        self.release(view.data());
        Ok(t)
    }

    /// Tells the kernel the mapped pages of `data` are not needed any more, so that loading a
    /// large checkpoint does not keep all of it resident.
    fn release(&self, data: &[u8]) {
        release_pages(
            &self.mmap,
            data.as_ptr() as usize - self.mmap.as_ptr() as usize,
            data.len(),
        );
    }
}

/// Parses a safetensors file held in memory as [`Weights::open`] does and lists its tensors
/// (name, dtype, shape) in header order, checking each one's dtype is one the loader reads. `path`
/// only names the file in errors. (The loader's checks without a file, for tests and fuzzing.)
pub fn inspect(bytes: &[u8], path: &Path) -> Result<Vec<(String, String, Vec<usize>)>> {
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.to_owned(),
        message: describe_safetensors_error(&e, bytes.len()),
    })?;
    let mut out = Vec::new();
    for (name, view) in tensors.iter() {
        match view.dtype() {
            safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16 => {}
            other => {
                return Err(Error::TensorDtype {
                    path: path.to_owned(),
                    name: name.to_owned(),
                    dtype: format!("{other:?}"),
                })
            }
        }
        out.push((
            name.to_owned(),
            format!("{:?}", view.dtype()),
            view.shape().to_vec(),
        ));
    }
    Ok(out)
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooLarge => {
            "its first 8 bytes do not give a plausible header length: not safetensors, or corrupt"
                .into()
        }
        E::HeaderTooSmall => format!("the file is only {file_len} bytes, too short for a header"),
        E::MetadataIncompleteBuffer => format!(
            "the file is truncated: its header describes more data than its {file_len} bytes"
        ),
        E::InvalidHeaderLength => {
            "the header length is larger than the file: the file is truncated or not safetensors"
                .into()
        }
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) | E::InvalidHeaderStart => {
            "the header is not valid safetensors JSON".into()
        }
        other => other.to_string(),
    }
}

/// A file of quantized matrices: `LFQC`, a key, records, and an end mark.
///
/// ```text
/// "LFQC" | u32 key length | key | records… | u32 0xFFFF_FFFF | u32 record count
/// record: u32 name length | name | u64 length | QMatrix bytes
/// ```
struct QuantCache {
    map: memmap2::Mmap,
    index: HashMap<String, (usize, usize)>,
}

const CACHE_MAGIC: &[u8; 4] = b"LFQC";
const CACHE_END: u32 = u32::MAX;

impl QuantCache {
    /// Opens a cache made with `key`; anything else (missing, stale, damaged, unfinished) is `None`.
    fn open(path: &Path, key: &str) -> Option<Self> {
        let file = std::fs::File::open(path).ok()?;
        // SAFETY: read-only map of a file the loader itself writes atomically (rename).
        let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let mut at = 0usize;
        let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
            let s = map.get(*at..at.checked_add(n)?)?;
            *at += n;
            Some(s)
        };
        if take(&mut at, 4)? != CACHE_MAGIC {
            return None;
        }
        let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let key_len = u32_of(take(&mut at, 4)?) as usize;
        if take(&mut at, key_len)? != key.as_bytes() {
            return None;
        }
        let mut index = HashMap::new();
        loop {
            let name_len = u32_of(take(&mut at, 4)?);
            if name_len == CACHE_END {
                let count = u32_of(take(&mut at, 4)?) as usize;
                return (count == index.len() && at == map.len()).then_some(Self { map, index });
            }
            let name = std::str::from_utf8(take(&mut at, name_len as usize)?)
                .ok()?
                .to_owned();
            let len = u64::from_le_bytes(take(&mut at, 8)?.try_into().ok()?) as usize;
            let start = at;
            take(&mut at, len)?;
            index.insert(name, (start, len));
        }
    }

    /// A matrix, copied out; its pages of the map are released at once, so that loading does not
    /// keep the file resident next to the copy.
    fn get(&self, name: &str) -> Option<QMatrix> {
        let &(start, len) = self.index.get(name)?;
        let q = QMatrix::from_bytes(&self.map[start..start + len]).ok();
        release_pages(&self.map, start, len);
        q
    }
}

/// Drops the resident pages of `map[start..start + len]` (whole pages only).
fn release_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    let page = 4096;
    let from = start.div_ceil(page) * page;
    let to = ((start + len) / page) * page;
    #[cfg(unix)]
    if to > from {
        // SAFETY: the range lies inside the map; dropping clean pages of a read-only file map
        // only means they are read from the file again if touched later.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
        };
    }
}

/// A cache being written: records go to a temporary file as they are made; `finish` renames it
/// into place, so a reader never sees half a file.
struct CacheWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    count: u32,
}

impl CacheWriter {
    fn create(path: &Path, key: &str) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        file.write_all(CACHE_MAGIC)?;
        file.write_all(&(key.len() as u32).to_le_bytes())?;
        file.write_all(key.as_bytes())?;
        Ok(Self {
            path: path.to_owned(),
            tmp,
            file,
            count: 0,
        })
    }

    fn add(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(&(name.len() as u32).to_le_bytes())?;
        self.file.write_all(name.as_bytes())?;
        self.file.write_all(&(bytes.len() as u64).to_le_bytes())?;
        self.file.write_all(bytes)?;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<PathBuf> {
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&CACHE_END.to_le_bytes()).map_err(io)?;
        self.file.write_all(&self.count.to_le_bytes()).map_err(io)?;
        self.file.flush().map_err(io)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io)?;
        Ok(self.path.clone())
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        // Unfinished (an error during loading): leave no temporary file behind.
        let _ = std::fs::remove_file(&self.tmp);
    }
}
