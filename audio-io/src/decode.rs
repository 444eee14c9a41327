//! Reading audio files of any common format (WAV 8/16/24/32-bit integer and float, FLAC, MP3,
//! Ogg Vorbis, ...) as a stream of mono f32 chunks, with bounded memory.
//!
//! A user's file is untrusted input: sample rates outside [`MIN_RATE`]..=[`MAX_RATE`] are refused
//! (a WAV header's rate is checked before the decoder sees it), only regular files are read (a FIFO
//! or a device would block or never end), and a panic inside the decoder crate while probing or
//! decoding becomes a [`FileError::Decoder`] for that file instead of taking the process down.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;

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
    #[error(
        "{path}: sample rate {rate} Hz is not supported (expected {} to {} Hz)",
        MIN_RATE,
        MAX_RATE
    )]
    Rate { path: PathBuf, rate: u64 },
    #[error("{path}: not a regular file (a pipe, device or directory cannot be decoded)")]
    NotRegular { path: PathBuf },
    #[error("{path}: the audio decoder failed on this file ({message})")]
    Decoder { path: PathBuf, message: String },
}

/// Lowest sample rate accepted from a file.
pub const MIN_RATE: u32 = 1_000;
/// Highest sample rate accepted from a file.
pub const MAX_RATE: u32 = 384_000;

thread_local! {
    /// Set while this thread runs decoder code whose panics are caught and reported as errors.
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
    /// The message of the last panic caught on this thread.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic inside it into `Err(message)`. The panic is not printed: it is
/// reported as an error of the file being read.
fn isolated<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET_PANICS.with(Cell::get) {
                let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
                    (*s).to_owned()
                } else if let Some(s) = info.payload().downcast_ref::<String>() {
                    s.clone()
                } else {
                    "a panic".to_owned()
                };
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(message));
            } else {
                previous(info);
            }
        }));
    });
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    result.map_err(|_| {
        let message = LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "a panic".to_owned());
        // One line: the first line of the decoder's message.
        message.lines().next().unwrap_or_default().to_owned()
    })
}

/// Checks the sample rate and channel count in a WAV (RIFF/RF64/WAVE) header before the decoder
/// sees them: the decoder divides by the rate. Other formats pass; they are checked after probing.
fn check_wav_header(path: &Path, file: &mut File) -> Result<(), FileError> {
    use std::io::{Seek, SeekFrom};
    let io = |source| FileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut head = Vec::with_capacity(4096);
    file.by_ref()
        .take(4096)
        .read_to_end(&mut head)
        .map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    if head.len() < 12 || !matches!(&head[0..4], b"RIFF" | b"RF64") || &head[8..12] != b"WAVE" {
        return Ok(());
    }
    let mut at = 12usize;
    while at + 8 <= head.len() {
        let id = &head[at..at + 4];
        let size = u32::from_le_bytes([head[at + 4], head[at + 5], head[at + 6], head[at + 7]]);
        if id == b"fmt " {
            let body = &head[at + 8..];
            if body.len() >= 8 {
                let channels = u16::from_le_bytes([body[2], body[3]]);
                let rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                check_rate(path, u64::from(rate))?;
                if channels == 0 {
                    return Err(FileError::Format {
                        path: path.to_owned(),
                        message: "the header says 0 channels".into(),
                    });
                }
            }
            return Ok(());
        }
        // Chunks are padded to an even size.
        at = at
            .saturating_add(8)
            .saturating_add(size as usize + (size as usize & 1));
    }
    Ok(())
}

fn check_rate(path: &Path, rate: u64) -> Result<(), FileError> {
    if (u64::from(MIN_RATE)..=u64::from(MAX_RATE)).contains(&rate) {
        Ok(())
    } else {
        Err(FileError::Rate {
            path: path.to_owned(),
            rate,
        })
    }
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
        // The type is checked before opening: opening a FIFO for reading blocks until a writer
        // comes.
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(FileError::NotRegular {
                path: path.to_owned(),
            });
        }
        let mut file = File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.len() == 0 {
            return Err(FileError::Empty {
                path: path.to_owned(),
            });
        }
        check_wav_header(path, &mut file)?;
        let mss = MediaSourceStream::new(Box::new(file), Default::default());
        let mut hint = Hint::new();
        if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
            hint.with_extension(ext);
        }
        let decoder_err = |message: String| FileError::Decoder {
            path: path.to_owned(),
            message,
        };
        let probed = isolated(|| {
            symphonia::default::get_probe().format(
                &hint,
                mss,
                &FormatOptions::default(),
                &MetadataOptions::default(),
            )
        })
        .map_err(decoder_err)?
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
        check_rate(path, u64::from(sample_rate))?;
        let channels = track
            .codec_params
            .channels
            .map(|c| c.count())
            .unwrap_or(1)
            .max(1);
        let track_id = track.id;
        let params = track.codec_params.clone();
        let decoder =
            isolated(|| symphonia::default::get_codecs().make(&params, &DecoderOptions::default()))
                .map_err(decoder_err)?
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
    /// complete packet. A panic of the decoder is an error, and the stream ends there.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<f32>>, FileError> {
        match isolated(|| self.next_chunk_inner()) {
            Ok(r) => r,
            Err(message) => {
                self.done = true;
                Err(FileError::Decoder {
                    path: self.path.clone(),
                    message,
                })
            }
        }
    }

    fn next_chunk_inner(&mut self) -> Result<Option<Vec<f32>>, FileError> {
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
