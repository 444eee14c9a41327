//! `lfm2d generate`: text in, streamed text out.

use std::io::Write;
use std::path::PathBuf;

use lfm2_audio::generate::generate_text;
use lfm2_audio::prompt::ChatState;
use lfm2_audio::sampling::{Sampler, SamplingParams};
use lfm2_audio::session::Session;
use lfm2_audio::tokenizer::TextStream;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (default: the model fetched by `lfm2d fetch-model`, from the hub cache).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
    /// Optional system prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; absent or 0 means greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep only the k most likely tokens (ties at the cut kept).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Positions of context: the prompt and the reply together (at most the model's). A prompt
    /// that does not fit is refused at once. Prefill attends over everything before it, so its
    /// cost grows with the square of the prompt's length: 4096 positions, as the daemon, by
    /// default.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Print one JSON object `{"text": ..., "text_ids": [...]}` instead of streaming text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: super::runtime::RuntimeArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(t) = args.temperature {
        anyhow::ensure!(
            t.is_finite() && t >= 0.0,
            "--temperature must be a finite number >= 0, got {t}"
        );
    }
    if args.top_k == Some(0) {
        anyhow::bail!("--top-k must be at least 1");
    }
    let model_dir = crate::model_cache::model_or_default(args.model.as_deref())?;
    let model = args.runtime.load(&model_dir)?;
    let tok = &model.tokenizer;
    let chat = ChatState::text_chat(tok, args.system.as_deref(), &args.prompt)?;
    let mut session = Session::new(model.backbone.clone())?;
    let prompt_ids = chat.text_ids();
    let model_context = session.remaining();
    let context = args.context.min(model_context);
    anyhow::ensure!(
        prompt_ids.len() < context,
        "the prompt has {} tokens, more than fit in the context of {context} positions \
         (--context; the model allows {model_context})",
        prompt_ids.len()
    );
    let max_new_tokens = args.max_new_tokens.min(context - prompt_ids.len());
    let hidden = session.prefill_text(&prompt_ids)?;
    let last = hidden.get(prompt_ids.len() - 1)?;
    let mut sampler = Sampler::new(SamplingParams::new(args.temperature, args.top_k), args.seed);

    let mut stream = TextStream::new();
    let stdout = std::io::stdout();
    let json = args.json;
    let (ids, _reason) = generate_text(
        &mut session,
        &last,
        &mut sampler,
        max_new_tokens,
        &[tok.special().im_end],
        |id| {
            if !json {
                if let Some(piece) = stream.push(tok, id)? {
                    let mut out = stdout.lock();
                    // A closed pipe (e.g. `| head`) ends generation quietly.
                    if out
                        .write_all(piece.as_bytes())
                        .and_then(|_| out.flush())
                        .is_err()
                    {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
    )?;
    let text = tok.decode(&ids)?;
    if json {
        println!("{}", serde_json::json!({ "text": text, "text_ids": ids }));
    } else {
        let _ = writeln!(stdout.lock());
    }
    Ok(())
}
