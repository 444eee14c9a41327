//! `lfm2d chat`: one spoken reply to a spoken question, with the reference's interleaved
//! generation (text and audio alternating).

use std::path::{Path, PathBuf};

use anyhow::Context;
use audio_io::decode::AudioFileReader;
use lfm2_audio::encoder::MAX_SECONDS;
use lfm2_audio::generate::{audio_chat, GenerationMode};
use lfm2_audio::sampling::SamplingParams;

use super::speech::{run_reply, SpeechArgs};

/// The reference's system prompt for speech-to-speech chat.
pub const DEFAULT_SYSTEM: &str = "Respond with interleaved text and audio.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The spoken question (WAV, FLAC, MP3, Ogg; 1 to 384 kHz, any channel count; at most 120 s).
    #[arg(long)]
    pub input: PathBuf,
    /// System prompt.
    #[arg(long, default_value = DEFAULT_SYSTEM)]
    pub system: String,
    #[command(flatten)]
    pub speech: SpeechArgs,
}

/// Reads the question, refusing a recording longer than the encoder takes at once
/// ([`MAX_SECONDS`]) as soon as the decoding gets past that length: memory stays bounded whatever
/// the file.
fn read_question(path: &Path) -> anyhow::Result<(Vec<f32>, u32)> {
    let mut reader = AudioFileReader::open(path)?;
    let rate = reader.sample_rate();
    let limit = MAX_SECONDS * rate as usize;
    let mut wave = Vec::new();
    while let Some(chunk) = reader.next_chunk()? {
        wave.extend_from_slice(&chunk);
        anyhow::ensure!(
            wave.len() <= limit,
            "{}: the question is longer than {MAX_SECONDS} s, the most `chat` takes \
             (`transcribe` reads recordings of any length)",
            path.display()
        );
    }
    Ok((wave, rate))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Reference defaults for chat: greedy text; audio at temperature 1.0, top-k 4.
    let params = args
        .speech
        .params(SamplingParams::new(Some(1.0), Some(4)))?;
    // The file is read first: a bad one is refused before the model loads.
    let (wave, rate) = read_question(&args.input)?;
    let model_dir = crate::model_cache::model_or_default(args.speech.model.as_deref())?;
    let model = args.speech.runtime.load(&model_dir)?;
    let audio = model
        .audio
        .embed_at(&wave, rate)
        .with_context(|| format!("encoding {}", args.input.display()))?;
    let tok = &model.tokenizer;
    let chat = audio_chat(tok, &args.system, audio)?;
    let mode = GenerationMode::Interleaved {
        n_text: model.config.interleaved_n_text,
        n_audio: model.config.interleaved_n_audio,
    };
    run_reply(&model, &chat, mode, &args.speech, params)
}
