//! `lfm2d speak`: text to speech with a voice preset, with the reference's sequential generation
//! (the model switches to audio with `<|audio_start|>`).

use std::path::PathBuf;

use lfm2_audio::generate::GenerationMode;
use lfm2_audio::prompt::ChatState;
use lfm2_audio::sampling::SamplingParams;

use super::speech::{run_reply, SpeechArgs};
use crate::voices;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The text to say.
    pub text: String,
    /// Voice preset (built in: us-male, us-female, uk-male, uk-female).
    #[arg(long, default_value = "us-female")]
    pub voice: String,
    /// A directory of extra voice presets (`*.toml`).
    #[arg(long)]
    pub voices_dir: Option<PathBuf>,
    #[command(flatten)]
    pub speech: SpeechArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let voice = voices::find(&args.voice, args.voices_dir.as_deref())?;
    anyhow::ensure!(
        !args.text.trim().is_empty(),
        "nothing to say: the text is empty"
    );
    let params = args.speech.params(SamplingParams::new(
        voice.audio_temperature,
        voice.audio_top_k,
    ))?;
    let model_dir = crate::model_cache::model_or_default(args.speech.model.as_deref())?;
    let model = args.speech.runtime.load(&model_dir)?;
    let tok = &model.tokenizer;
    let mut chat = ChatState::new(tok)?;
    chat.new_turn(tok, "system")?;
    chat.add_text(tok, &voice.system_prompt)?;
    chat.end_turn(tok)?;
    chat.new_turn(tok, "user")?;
    chat.add_text(tok, &args.text)?;
    chat.end_turn(tok)?;
    chat.new_turn(tok, "assistant")?;
    run_reply(
        &model,
        &chat,
        GenerationMode::Sequential,
        &args.speech,
        params,
    )
}
