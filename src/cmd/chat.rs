//! `lfm2d chat`: one spoken reply to a spoken question, with the reference's interleaved
//! generation (text and audio alternating).

use std::path::PathBuf;

use anyhow::Context;
use lfm2_audio::generate::{audio_chat, GenerationMode};
use lfm2_audio::sampling::SamplingParams;

use super::speech::{run_reply, SpeechArgs};

/// The reference's system prompt for speech-to-speech chat.
pub const DEFAULT_SYSTEM: &str = "Respond with interleaved text and audio.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The spoken question (WAV, FLAC, MP3, Ogg; any rate and channel count).
    #[arg(long)]
    pub input: PathBuf,
    /// System prompt.
    #[arg(long, default_value = DEFAULT_SYSTEM)]
    pub system: String,
    #[command(flatten)]
    pub speech: SpeechArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Reference defaults for chat: greedy text; audio at temperature 1.0, top-k 4.
    let params = args
        .speech
        .params(SamplingParams::new(Some(1.0), Some(4)))?;
    let model_dir = crate::model_cache::model_or_default(args.speech.model.as_deref())?;
    let model = args.speech.runtime.load(&model_dir)?;
    let (wave, rate) = audio_io::decode::read_mono(&args.input)?;
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
