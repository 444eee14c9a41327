//! `lfm2d transcribe`: speech recognition of audio files, streamed as it is generated.
//!
//! A file is decoded, downmixed and resampled to 16 kHz as a stream; it is split at silences into
//! clips of at most `--max-segment-seconds` (a recording shorter than that is one clip, exactly as
//! the reference transcribes it); each clip is transcribed with the reference's ASR prompt and
//! greedy decoding. Memory stays bounded whatever the length of the file.

use std::io::Write;
use std::path::{Path, PathBuf};

use audio_io::decode::AudioFileReader;
use audio_io::segment::{Segment, Segmenter};
use lfm2_audio::audio::MIN_SAMPLES;
use lfm2_audio::format::INPUT_SAMPLE_RATE;
use lfm2_audio::generate::{asr_chat, generate_text, prefill_chat, StopReason};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::resample::Resampler;
use lfm2_audio::sampling::{Sampler, SamplingParams};
use lfm2_audio::session::Session;
use lfm2_audio::tokenizer::TextStream;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (default: the model fetched by `lfm2d fetch-model`, from the hub cache).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Audio files (WAV, FLAC, MP3, Ogg Vorbis; any rate, any channel count).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print one JSON object per file instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Most tokens per clip.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Longest clip given to the model at once (1 to 120 s); longer recordings are split at
    /// silences.
    #[arg(long, default_value_t = 30.0)]
    pub max_segment_seconds: f32,
    #[command(flatten)]
    pub runtime: super::runtime::RuntimeArgs,
}

/// The transcript of one clip.
struct ClipText {
    start: f64,
    end: f64,
    text: String,
    ids: Vec<u32>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let max = lfm2_audio::audio::MAX_SECONDS;
    anyhow::ensure!(
        args.max_segment_seconds.is_finite()
            && (1.0..=max as f32).contains(&args.max_segment_seconds),
        "--max-segment-seconds must be between 1 and {max}, got {}",
        args.max_segment_seconds
    );
    let model_dir = crate::model_cache::model_or_default(args.model.as_deref())?;
    let model = args.runtime.load(&model_dir)?;
    let mut failed = 0;
    for file in &args.files {
        if !args.json && args.files.len() > 1 {
            println!("== {}", file.display());
        }
        match transcribe_file(&model, file, &args) {
            Ok(clips) => {
                if args.json {
                    let text = join(clips.iter().map(|c| c.text.as_str()));
                    let ids: Vec<u32> = clips.iter().flat_map(|c| c.ids.iter().copied()).collect();
                    let segments: Vec<_> = clips
                        .iter()
                        .map(|c| serde_json::json!({"start": c.start, "end": c.end, "text": c.text, "text_ids": c.ids}))
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"file": file.display().to_string(), "text": text, "text_ids": ids, "segments": segments})
                    );
                } else {
                    println!();
                }
            }
            Err(err) => {
                failed += 1;
                if !args.json {
                    println!();
                }
                eprintln!("error: {err:#}");
            }
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} files could not be transcribed",
        args.files.len()
    );
    Ok(())
}

fn join<'a>(parts: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for p in parts {
        if !out.is_empty()
            && !out.ends_with(char::is_whitespace)
            && !p.starts_with(char::is_whitespace)
            && !p.is_empty()
        {
            out.push(' ');
        }
        out.push_str(p);
    }
    out
}

fn transcribe_file(
    model: &Lfm2AudioModel,
    path: &Path,
    args: &Args,
) -> anyhow::Result<Vec<ClipText>> {
    let mut reader = AudioFileReader::open(path)?;
    let mut resampler =
        Resampler::new(reader.sample_rate(), INPUT_SAMPLE_RATE).map_err(anyhow::Error::msg)?;
    let max_len = (args.max_segment_seconds * INPUT_SAMPLE_RATE as f32) as usize;
    let mut segmenter = Segmenter::new(
        max_len,
        (max_len / 3).min(10 * INPUT_SAMPLE_RATE as usize),
        1600,
    );
    let mut clips = Vec::new();
    let mut resampled = Vec::new();
    let mut total = 0u64;
    while let Some(chunk) = reader.next_chunk()? {
        resampled.clear();
        resampler.push(&chunk, &mut resampled);
        for seg in segmenter.push(&resampled) {
            total += seg.samples.len() as u64;
            clips.push(transcribe_clip(model, seg, args, clips.is_empty())?);
        }
    }
    resampled.clear();
    resampler.finish(&mut resampled);
    let mut rest = segmenter.push(&resampled);
    rest.extend(segmenter.finish());
    for mut seg in rest {
        total += seg.samples.len() as u64;
        if seg.samples.len() < MIN_SAMPLES {
            anyhow::ensure!(
                !clips.is_empty(),
                "{}: the recording is {:.0} ms long; the model needs at least {} ms of audio",
                path.display(),
                total as f64 / 16.0,
                MIN_SAMPLES / 16
            );
            // A short tail after a cut: pad it with silence to the encoder's minimum.
            seg.samples.resize(MIN_SAMPLES, 0.0);
        }
        clips.push(transcribe_clip(model, seg, args, clips.is_empty())?);
    }
    anyhow::ensure!(
        total > 0,
        "{}: the file holds no audio samples",
        path.display()
    );
    Ok(clips)
}

fn transcribe_clip(
    model: &Lfm2AudioModel,
    seg: Segment,
    args: &Args,
    first: bool,
) -> anyhow::Result<ClipText> {
    let tok = &model.tokenizer;
    let start = seg.start as f64 / INPUT_SAMPLE_RATE as f64;
    let end = start + seg.samples.len() as f64 / INPUT_SAMPLE_RATE as f64;
    let audio = model.audio.embed(&seg.samples)?;
    let chat = asr_chat(tok, audio)?;
    let mut session = Session::new(model.backbone.clone())?;
    let hidden = prefill_chat(&mut session, &chat)?;
    let mut sampler = Sampler::new(SamplingParams::GREEDY, 0);
    let mut stream = TextStream::new();
    let mut need_space = !first;
    let stdout = std::io::stdout();
    let special = tok.special();
    let (ids, reason) = generate_text(
        &mut session,
        &hidden,
        &mut sampler,
        args.max_new_tokens,
        &[special.im_end, special.audio_start],
        |id| {
            if !args.json {
                if let Some(piece) = stream.push(tok, id)? {
                    let mut out = stdout.lock();
                    if need_space && !piece.starts_with(char::is_whitespace) {
                        let _ = out.write_all(b" ");
                    }
                    need_space = false;
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
    if reason == StopReason::ContextFull {
        eprintln!(
            "warning: the clip at {start:.1} s filled the model's context; its transcript is cut"
        );
    }
    Ok(ClipText {
        start,
        end,
        text: tok.decode(&ids)?,
        ids,
    })
}
