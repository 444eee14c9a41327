//! What `chat` and `speak` share: sampling flags, and running one spoken reply into a WAV file
//! while its text streams to stdout.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use codec::{Detokenizer, DetokenizerChoice};
use lfm2_audio::format::{Frame, END_OF_AUDIO, SAMPLES_PER_FRAME};
use lfm2_audio::generate::{prefill_chat, GenerationMode, GenerationParams, Generator, Token};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::ChatState;
use lfm2_audio::sampling::SamplingParams;
use lfm2_audio::session::Session;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CodecArg {
    /// The LFM2 detokenizer when the model has `audio_detokenizer/`, else Mimi.
    #[default]
    Auto,
    Lfm2,
    Mimi,
}

impl From<CodecArg> for DetokenizerChoice {
    fn from(c: CodecArg) -> Self {
        match c {
            CodecArg::Auto => DetokenizerChoice::Auto,
            CodecArg::Lfm2 => DetokenizerChoice::Lfm2,
            CodecArg::Mimi => DetokenizerChoice::Mimi,
        }
    }
}

/// Flags shared by the commands that speak.
#[derive(clap::Args, Debug, Clone)]
pub struct SpeechArgs {
    /// Model directory (default: the model fetched by `lfm2d fetch-model`, from the hub cache).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to write the reply (24 kHz mono WAV, written as it is generated).
    #[arg(long)]
    pub out: PathBuf,
    /// Most text tokens plus audio frames to generate.
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Which decoder turns audio codes into sound.
    #[arg(long, value_enum, default_value = "auto")]
    pub codec: CodecArg,
    /// Text sampling temperature (absent or 0: greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Text top-k.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Audio sampling temperature (0: greedy).
    #[arg(long)]
    pub audio_temperature: Option<f32>,
    /// Audio top-k.
    #[arg(long)]
    pub audio_top_k: Option<usize>,
    /// Greedy text and audio (overrides the sampling flags).
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object (text, ids, every frame, sample count) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: super::runtime::RuntimeArgs,
}

impl SpeechArgs {
    /// Sampling from the flags, with `audio_default` where no audio flag is given.
    pub fn params(&self, audio_default: SamplingParams) -> anyhow::Result<GenerationParams> {
        for (flag, t) in [
            ("--temperature", self.temperature),
            ("--audio-temperature", self.audio_temperature),
        ] {
            if let Some(t) = t {
                anyhow::ensure!(
                    t.is_finite() && t >= 0.0,
                    "{flag} must be a finite number >= 0, got {t}"
                );
            }
        }
        for (flag, k) in [("--top-k", self.top_k), ("--audio-top-k", self.audio_top_k)] {
            anyhow::ensure!(k != Some(0), "{flag} must be at least 1");
        }
        let (text, audio) = if self.greedy {
            (SamplingParams::GREEDY, SamplingParams::GREEDY)
        } else {
            let audio = if self.audio_temperature.is_some() || self.audio_top_k.is_some() {
                SamplingParams::new(
                    self.audio_temperature.or(audio_default.temperature),
                    self.audio_top_k.or(audio_default.top_k),
                )
            } else {
                audio_default
            };
            (SamplingParams::new(self.temperature, self.top_k), audio)
        };
        Ok(GenerationParams {
            max_new_tokens: self.max_new_tokens,
            text,
            audio,
            seed: self.seed,
        })
    }
}

/// A WAV file written as samples arrive; its header is brought up to date after every write, so
/// an interrupted reply leaves a valid file.
pub struct WavOut {
    writer: hound::WavWriter<BufWriter<std::fs::File>>,
    samples: u64,
}

impl WavOut {
    pub fn create(path: &Path, rate: u32) -> anyhow::Result<Self> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let writer = hound::WavWriter::create(path, spec)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { writer, samples: 0 })
    }

    pub fn write(&mut self, samples: &[f32]) -> anyhow::Result<()> {
        for &s in samples {
            self.writer
                .write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16)?;
        }
        self.samples += samples.len() as u64;
        self.writer.flush()?;
        Ok(())
    }

    pub fn finish(self) -> anyhow::Result<u64> {
        self.writer.finalize()?;
        Ok(self.samples)
    }
}

/// Runs one reply: prefill `chat`, generate, stream text to stdout (unless `--json`) and audio
/// to the WAV file.
pub fn run_reply(
    model: &Lfm2AudioModel,
    chat: &ChatState,
    mode: GenerationMode,
    args: &SpeechArgs,
    params: GenerationParams,
) -> anyhow::Result<()> {
    let mut detok: Box<dyn Detokenizer> =
        codec::open_detokenizer_with(&model.dir.root, args.codec.into(), &model.plan)
            .with_context(|| {
                format!("loading the audio decoder of {}", model.dir.root.display())
            })?;
    let mut wav = WavOut::create(&args.out, detok.sample_rate())?;
    let tok = &model.tokenizer;
    let mut session = Session::new(model.backbone.clone())?;
    let hidden = prefill_chat(&mut session, chat)?;
    let mut generator = Generator::new(
        &mut session,
        &model.audio_head,
        tok.special(),
        mode,
        params,
        hidden,
    );

    let mut text_ids = Vec::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut printed = String::new();
    let mut pcm = Vec::with_capacity(SAMPLES_PER_FRAME);
    let mut skipped = 0usize;
    let stdout = std::io::stdout();
    while let Some(token) = generator.next_item()? {
        match token {
            Token::Text(id) => {
                text_ids.push(id);
                if !args.json {
                    // Print the readable text as it grows (special tokens left out).
                    let text = tok.decode_readable(&text_ids)?;
                    if text.len() > printed.len()
                        && text.starts_with(&printed)
                        && !text.ends_with('\u{FFFD}')
                    {
                        let mut out = stdout.lock();
                        let _ = out
                            .write_all(&text.as_bytes()[printed.len()..])
                            .and_then(|_| out.flush());
                        printed = text;
                    }
                }
            }
            Token::Audio(frame) => {
                // End-of-audio frames (and frames holding the end-of-audio code elsewhere) carry no sound.
                if !frame.contains(&END_OF_AUDIO) {
                    pcm.clear();
                    detok.push_into(&frame, &mut pcm)?;
                    wav.write(&pcm)?;
                } else if frame[0] != END_OF_AUDIO {
                    skipped += 1;
                }
                frames.push(frame);
            }
        }
    }
    pcm.clear();
    detok.flush_into(&mut pcm)?;
    wav.write(&pcm)?;
    let samples = wav.finish()?;
    if skipped > 0 {
        eprintln!("warning: {skipped} frames held the end-of-audio code outside codebook 0 and were not decoded");
    }
    if args.json {
        let text = tok.decode_readable(&text_ids)?;
        println!(
            "{}",
            serde_json::json!({"text": text, "text_ids": text_ids, "frames": frames, "sample_rate": detok.sample_rate(), "samples": samples})
        );
    } else {
        let _ = writeln!(stdout.lock());
        eprintln!(
            "wrote {} ({:.2} s of audio)",
            args.out.display(),
            samples as f64 / detok.sample_rate() as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_reply_leaves_a_valid_wav() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial.wav");
        let mut wav = WavOut::create(&path, 24_000).unwrap();
        wav.write(&vec![0.25; 1920]).unwrap();
        wav.write(&vec![-0.25; 1440]).unwrap();
        // The process dies here: nothing is finalised.
        std::mem::forget(wav);
        let r = hound::WavReader::open(&path).unwrap();
        assert_eq!((r.spec().sample_rate, r.duration()), (24_000, 3360));
    }
}
