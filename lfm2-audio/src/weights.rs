//! Reading tensors from a safetensors checkpoint with errors that name the file and the tensor.
//!
//! The file is memory-mapped and its header parsed once; tensors are converted to f32 (the
//! compute dtype) when they are taken. F32, BF16 and F16 storage is accepted.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// An open safetensors file.
pub struct Weights {
    path: PathBuf,
    // `tensors` borrows from `mmap`; the map lives as long as `self` and is never moved out.
    tensors: SafeTensors<'static>,
    _mmap: memmap2::Mmap,
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
            _mmap: mmap,
        })
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
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        Ok(t.to_dtype(DType::F32)?)
    }
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
