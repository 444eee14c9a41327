//! Reading audio files of any common format (WAV 8/16/24/32-bit integer and float, FLAC, MP3,
//! Ogg Vorbis, ...) as a stream of mono f32 chunks, with bounded memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{Decoder, DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::{FormatOptions, FormatReader};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the file is empty")]
    Empty { path: PathBuf },
    #[error("{path}: not a readable audio file ({message})")]
    Format { path: PathBuf, message: String },
    #[error("{path}: sample {index} is not a finite number")]
    NotFinite { path: PathBuf, index: u64 },
}

/// A decoding stream of an audio file, downmixed to mono (mean of the channels).
pub struct AudioFileReader {
    path: PathBuf,
    format: Box<dyn FormatReader>,
    decoder: Box<dyn Decoder>,
    track_id: u32,
    sample_rate: u32,
    channels: usize,
    samples_read: u64,
    done: bool,
}

impl AudioFileReader {
    pub fn open(path: &Path) -> Result<Self, FileError> {
        let io = |source| FileError::Io {
            path: path.to_owned(),
            source,
        };
        let format_err = |message: String| FileError::Format {
            path: path.to_owned(),
            message,
        };
        let file = File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.len() == 0 {
            return Err(FileError::Empty {
                path: path.to_owned(),
            });
        }
        let mss = MediaSourceStream::new(Box::new(file), Default::default());
        let mut hint = Hint::new();
        if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
            hint.with_extension(ext);
        }
        let probed = symphonia::default::get_probe()
            .format(
                &hint,
                mss,
                &FormatOptions::default(),
                &MetadataOptions::default(),
            )
            .map_err(|e| format_err(describe(&e)))?;
        let format = probed.format;
        let track = format
            .tracks()
            .iter()
            .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
            .ok_or_else(|| format_err("no audio track".into()))?;
        let sample_rate = track
            .codec_params
            .sample_rate
            .ok_or_else(|| format_err("no sample rate".into()))?;
        if sample_rate == 0 {
            return Err(format_err("the sample rate is 0".into()));
        }
        let channels = track
            .codec_params
            .channels
            .map(|c| c.count())
            .unwrap_or(1)
            .max(1);
        let track_id = track.id;
        let decoder = symphonia::default::get_codecs()
            .make(&track.codec_params, &DecoderOptions::default())
            .map_err(|e| format_err(describe(&e)))?;
        Ok(Self {
            path: path.to_owned(),
            format,
            decoder,
            track_id,
            sample_rate,
            channels,
            samples_read: 0,
            done: false,
        })
    }

    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The next chunk of mono samples, `None` at the end. A file cut short ends at the last
    /// complete packet.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, FileError> {
        while !self.done {
            let packet = match self.format.next_packet() {
                Ok(p) => p,
                Err(SymphoniaError::IoError(e))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    self.done = true;
                    break;
                }
                Err(SymphoniaError::ResetRequired) => {
                    self.done = true;
                    break;
                }
                Err(e) => {
                    return Err(FileError::Format {
                        path: self.path.clone(),
                        message: describe(&e),
                    })
                }
            };
            if packet.track_id() != self.track_id {
                continue;
            }
            let decoded = match self.decoder.decode(&packet) {
                Ok(d) => d,
                // A damaged packet is skipped, as players do; the rest of the file still counts.
                Err(SymphoniaError::DecodeError(_)) => continue,
                Err(e) => {
                    return Err(FileError::Format {
                        path: self.path.clone(),
                        message: describe(&e),
                    })
                }
            };
            let spec = *decoded.spec();
            let channels = spec.channels.count().max(1);
            let mut buf = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
            buf.copy_interleaved_ref(decoded);
            let mono: Vec<f32> = buf
                .samples()
                .chunks(channels)
                .map(|frame| frame.iter().sum::<f32>() / channels as f32)
                .collect();
            if let Some(i) = mono.iter().position(|x| !x.is_finite()) {
                return Err(FileError::NotFinite {
                    path: self.path.clone(),
                    index: self.samples_read + i as u64,
                });
            }
            self.samples_read += mono.len() as u64;
            if !mono.is_empty() {
                return Ok(Some(mono));
            }
        }
        Ok(None)
    }

    /// Reads the rest of the file.
    pub fn read_all(&mut self) -> Result<Vec<f32>, FileError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next_chunk()? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }
}

fn describe(e: &SymphoniaError) -> String {
    match e {
        SymphoniaError::Unsupported(what) => format!("unsupported format or codec: {what}"),
        SymphoniaError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the file ends too early (truncated header?)".into()
        }
        other => other.to_string(),
    }
}

/// Reads a whole file as mono samples and its sample rate.
pub fn read_mono(path: &Path) -> Result<(Vec<f32>, u32), FileError> {
    let mut reader = AudioFileReader::open(path)?;
    let samples = reader.read_all()?;
    Ok((samples, reader.sample_rate()))
}
