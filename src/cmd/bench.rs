//! `lfm2d bench`: how fast the model runs on this machine, as a table of medians.
//!
//! Measured: prefill (tokens/s), text decode (steps/s, text head included), audio frames
//! (backbone step + 8 depthformer steps, no text head), detokenizer time per frame, the real-time
//! factor of interleaved speech-to-speech over 10 s of generated speech, time to first audio after
//! a 4 s utterance (split into its stages), the top-1 agreement of quantized decoding with f32,
//! and peak memory; then the memory roofline: the pool's read bandwidth, the text step's and the
//! depthformer's share of it, and the real-time factor that the weights' reads alone allow. Use
//! a full-size random model (`lfm2d synth-model`): speed does not depend on the weights' values.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use codec::{ReplyStream, StreamEvent};
use lfm2_audio::format::{Frame, AUDIO_CODES, CODEBOOKS, END_OF_AUDIO, INPUT_SAMPLE_RATE};
use lfm2_audio::generate::{
    audio_chat, ends_audio, prefill_chat, Generation, GenerationMode, GenerationParams, Generator,
    Token,
};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::{ChatState, Item};
use lfm2_audio::sampling::{argmax, Sampler, SamplingParams};
use lfm2_audio::session::Session;

use super::runtime::{Quant, RuntimeArgs};
use super::speech::CodecArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (e.g. one written by `lfm2d synth-model`; default: the model fetched by
    /// `lfm2d fetch-model`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Repetitions of each measurement; the table shows medians.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Seconds of generated speech for the real-time factor.
    #[arg(long, default_value_t = 10.0)]
    pub speech_seconds: f64,
    /// Seconds of the user utterance for the time to first audio.
    #[arg(long, default_value_t = 4.0)]
    pub utterance_seconds: f64,
    /// Positions of earlier conversation already in the cache when the measured speech-to-speech
    /// turn starts (time to first audio and real-time factor): how they hold up deep into a long
    /// session. About 12.5 positions per second of speech on either side.
    #[arg(long, default_value_t = 0)]
    pub history: usize,
    /// Greedy steps compared with f32 for the agreement (0 skips it; it loads the model twice).
    #[arg(long, default_value_t = 200)]
    pub agreement_steps: usize,
    /// Also measure candle-transformers' quantized_lfm2 on the same backbone (Q8/Q4 only).
    #[arg(long)]
    pub peer: bool,
    #[arg(long, value_enum, default_value = "auto")]
    pub codec: CodecArg,
    /// Where the real-time-factor run decodes audio: on the generating thread between steps
    /// (`inline`), or on a thread of its own with a one-thread pool, overlapping generation
    /// (`thread`).
    #[arg(long, value_enum, default_value = "inline")]
    pub detokenizer: DetokenizerPlacement,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetokenizerPlacement {
    Inline,
    Thread,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Deterministic token ids that avoid the special tokens.
fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (600 + (i * 7919 + salt * 104_729) % (vocab.saturating_sub(700).max(1))) as u32)
        .collect()
}

/// A 4-second-like test utterance: a gliding tone with harmonics and a little noise, 16 kHz.
fn utterance(seconds: f64) -> Vec<f32> {
    let n = (seconds * f64::from(INPUT_SAMPLE_RATE)) as usize;
    let mut seed = 12345u32;
    (0..n)
        .map(|i| {
            let t = i as f32 / INPUT_SAMPLE_RATE as f32;
            let f = 140.0 + 60.0 * (t * 1.3).sin();
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let noise = (seed >> 9) as f32 / (1u32 << 23) as f32 - 0.5;
            0.2 * (2.0 * std::f32::consts::PI * f * t).sin()
                + 0.08 * (6.0 * std::f32::consts::PI * f * t).sin()
                + 0.01 * noise
        })
        .collect()
}

/// `", after N positions of history"` when there is some.
fn history_note(history: usize) -> String {
    if history == 0 {
        String::new()
    } else {
        format!(", after {history} positions of history")
    }
}

/// A `key: N kB` line of a /proc file of this process (Linux), in bytes.
fn proc_bytes(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident memory of this process so far (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmHWM:")
}

/// Resident memory of this process now (Linux), in bytes.
fn rss() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmRSS:")
}

/// Plain reads of memory set beside the timed runs: each run is compared with the read rate of
/// its own moment (the mean of a read just before and one just after it), since on some machines
/// the memory bus changes speed from one minute to the next.
struct Roofline {
    probe: lfm2_audio::quant::ReadProbe,
    pool: std::sync::Arc<lfm2_audio::quant::Threads>,
    /// Every read's rate, GB/s.
    rates: Vec<f64>,
    /// Resident memory the probe added, to leave out of the memory rows.
    probe_rss: u64,
    /// Peak resident memory before the probe was allocated.
    peak_before: Option<u64>,
    /// Memory in huge pages before the probe was allocated.
    huge_before: Option<u64>,
}

impl Roofline {
    const BYTES: usize = 512 << 20;

    fn new(pool: std::sync::Arc<lfm2_audio::quant::Threads>) -> Self {
        let (peak_before, huge_before, rss_before) = (peak_rss(), huge_page_bytes(), rss());
        let probe = lfm2_audio::quant::ReadProbe::new(Self::BYTES);
        let probe_rss = rss()
            .zip(rss_before)
            .map_or(probe.len() as u64, |(now, before)| {
                now.saturating_sub(before)
            });
        // The first pass warms the pool and the page tables.
        probe.rate(&pool);
        Self {
            probe,
            pool,
            rates: Vec::new(),
            probe_rss,
            peak_before,
            huge_before,
        }
    }

    /// Reads the probe once and returns its rate in GB/s.
    fn read(&mut self) -> f64 {
        let rate = self.probe.rate(&self.pool);
        self.rates.push(rate);
        rate
    }

    /// Runs `f`, returning its result and the read rate around it.
    fn beside<T>(&mut self, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
        let before = self.read();
        let out = f()?;
        Ok((out, (before + self.read()) / 2.0))
    }

    /// Peak resident memory without the probe.
    fn peak_rss(&self) -> Option<u64> {
        let during = peak_rss()?.saturating_sub(self.probe_rss);
        Some(self.peak_before.map_or(during, |b| b.max(during)))
    }
}

/// Anonymous memory of this process in transparent huge pages (Linux), in bytes: the quantized
/// weights where the system gave them 2 MiB pages.
fn huge_page_bytes() -> Option<u64> {
    proc_bytes("/proc/self/smaps_rollup", "AnonHugePages:")
}

/// The CPU as /proc/cpuinfo names it, with its family and model numbers (which tell CPU
/// generations apart when the name is generic, as in virtual machines).
fn cpu_model() -> String {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return std::env::consts::ARCH.to_string();
    };
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{name} (family {f}, model {m})"),
        _ => name,
    }
}

struct Row {
    name: &'static str,
    value: f64,
    unit: &'static str,
    note: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=1000).contains(&args.runs),
        "--runs must be from 1 to 1000, got {}",
        args.runs
    );
    anyhow::ensure!(
        args.speech_seconds.is_finite()
            && args.speech_seconds > 0.0
            && args.speech_seconds <= 3600.0,
        "--speech-seconds must be in (0, 3600], got {}",
        args.speech_seconds
    );
    let max_utterance = lfm2_audio::encoder::MAX_SECONDS as f64;
    anyhow::ensure!(
        args.utterance_seconds.is_finite()
            && args.utterance_seconds >= 0.1
            && args.utterance_seconds <= max_utterance,
        "--utterance-seconds must be from 0.1 to {max_utterance}, got {}",
        args.utterance_seconds
    );
    let start = Instant::now();
    let model_dir = crate::model_cache::model_or_default(args.model.as_deref())?;
    let model = args.runtime.load(&model_dir)?;
    let load_s = start.elapsed().as_secs_f64();
    let mut detok = codec::open_detokenizer_with(&model_dir, args.codec.into(), &model.plan)
        .context("loading the audio decoder")?;
    let threads = args
        .runtime
        .threads
        .unwrap_or_else(lfm2_audio::quant::Threads::available);
    eprintln!(
        "bench: {} ({:?}, {threads} threads), backbone weights {:.0} MB, loaded in {load_s:.1} s",
        model_dir.display(),
        args.runtime.quant,
        model.backbone.weight_bytes() as f64 / 1e6
    );
    let vocab = model.config.lfm.vocab_size;
    let context = model.config.lfm.max_position_embeddings;
    anyhow::ensure!(
        args.prefill_tokens >= 1 && args.prefill_tokens <= context,
        "--prefill-tokens must be from 1 to the model's context of {context}, got {}",
        args.prefill_tokens
    );
    anyhow::ensure!(
        args.history <= context / 2,
        "--history must be at most {} (half the model's context of {context}), got {}",
        context / 2,
        args.history
    );
    let mut rows = Vec::new();

    // Prefill.
    let mut v = Vec::new();
    for r in 0..args.runs {
        let ids = tokens(args.prefill_tokens, vocab, r);
        let mut s = Session::new(model.backbone.clone())?;
        let t = Instant::now();
        s.prefill_text(&ids)?;
        v.push(args.prefill_tokens as f64 / t.elapsed().as_secs_f64());
    }
    rows.push(Row {
        name: "prefill",
        value: median(v),
        unit: "tok/s",
        note: format!("{} positions", args.prefill_tokens),
    });

    // From here on every timed run is set beside the read rate of its moment (the roofline).
    let pool = model.plan.threads.clone().map_or_else(
        || lfm2_audio::quant::Threads::new(threads).map(std::sync::Arc::new),
        Ok,
    )?;
    let mut roof = Roofline::new(pool.clone());
    // A text step reads every backbone weight and the tied head once; a frame the layers and
    // the depthformer's weights.
    let step_bytes = model.backbone.weight_bytes() as f64;
    let depth_bytes = model.audio_head.frame_weight_bytes() as f64;
    let frame_bytes = model.backbone.stack().weight_bytes() as f64 + depth_bytes;

    // Text decode: backbone step + text head + argmax.
    let steps = 32;
    let mut v = Vec::new();
    let mut text_share = Vec::new();
    for r in 0..args.runs {
        let mut s = Session::new(model.backbone.clone())?;
        let mut h = s.prefill_text(&tokens(16, vocab, r))?.get(15)?;
        let (rate, read) = roof.beside(|| {
            let t = Instant::now();
            for _ in 0..steps {
                let logits = model
                    .backbone
                    .text_logits(&h.unsqueeze(0)?)?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                let id = argmax(&logits).min(vocab as u32 - 1);
                h = s.step_text(id)?;
            }
            Ok(steps as f64 / t.elapsed().as_secs_f64())
        })?;
        v.push(rate);
        text_share.push(step_bytes * rate / 1e9 / read * 100.0);
    }
    rows.push(Row {
        name: "text decode",
        value: median(v),
        unit: "step/s",
        note: "backbone + text head".into(),
    });

    // Audio frames: backbone step on the frame embedding + depthformer, no text head.
    let mut v = Vec::new();
    let mut depth = Vec::new();
    let mut depth_share = Vec::new();
    for r in 0..args.runs {
        let mut s = Session::new(model.backbone.clone())?;
        let mut h = s.prefill_text(&tokens(16, vocab, r))?.get(15)?;
        let mut sampler = Sampler::new(SamplingParams::new(Some(1.0), Some(4)), r as u64);
        let ((rate, in_head), read) = roof.beside(|| {
            let mut in_head = 0.0;
            let t = Instant::now();
            for _ in 0..steps {
                let th = Instant::now();
                let frame = model.audio_head.sample_frame(&h, &mut sampler)?;
                in_head += th.elapsed().as_secs_f64();
                h = s.step(&model.audio_head.frame_embedding(&frame)?, Item::AudioOut)?;
            }
            Ok((
                steps as f64 / t.elapsed().as_secs_f64(),
                in_head / steps as f64,
            ))
        })?;
        v.push(rate);
        depth.push(in_head * 1e3);
        depth_share.push(depth_bytes / in_head / 1e9 / read * 100.0);
    }
    rows.push(Row {
        name: "audio frame",
        value: median(v),
        unit: "frame/s",
        note: "backbone + depthformer (8 steps)".into(),
    });
    rows.push(Row {
        name: "depthformer",
        value: median(depth),
        unit: "ms/frame",
        note: "of the audio frame: depth_linear, 8 steps, heads and sampling".into(),
    });

    // Detokenizer.
    let mut v = Vec::new();
    let mut out = Vec::with_capacity(4096);
    let mut seed = 7u32;
    for _ in 0..args.runs {
        detok.reset();
        let mut times = Vec::new();
        for _ in 0..25 {
            let mut frame: Frame = [0u32; CODEBOOKS];
            for c in frame.iter_mut() {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *c = (seed >> 8) % AUDIO_CODES;
            }
            out.clear();
            let t = Instant::now();
            detok.push_into(&frame, &mut out)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        v.push(median(times));
    }
    rows.push(Row {
        name: "detokenizer",
        value: median(v),
        unit: "ms/frame",
        note: "one 80 ms frame, streaming".into(),
    });

    // Time to first audio and real-time factor, on a speech-to-speech turn.
    let decode_thread = match args.detokenizer {
        DetokenizerPlacement::Inline => None,
        DetokenizerPlacement::Thread => {
            let plan = lfm2_audio::weights::QuantPlan {
                threads: Some(std::sync::Arc::new(lfm2_audio::quant::Threads::new(1)?)),
                ..model.plan.clone()
            };
            let own = codec::open_detokenizer_with(&model_dir, args.codec.into(), &plan)
                .context("loading the audio decoder")?;
            Some(codec::DecodeThread::spawn(own)?)
        }
    };
    // Waits for the samples of one frame from the decoder thread.
    let decoded = |t: &codec::DecodeThread| -> anyhow::Result<()> {
        match t.recv() {
            Some(codec::Decoded::Samples(s)) => {
                t.recycle(s);
                Ok(())
            }
            Some(codec::Decoded::Failed(e)) => Err(e.into()),
            other => anyhow::bail!("unexpected reply from the decoder thread: {other:?}"),
        }
    };
    let wave = utterance(args.utterance_seconds);
    let mut ttfa = Vec::new();
    let mut stages: Vec<[f64; 4]> = Vec::new();
    let mut rtf = Vec::new();
    // Per turn, the real-time factor of reading its weights alone: the weights its text steps
    // (layers and head) and frames (layers and depthformer) read after its first audible frame,
    // per second of speech, at the read rate around the turn.
    let (mut floors, mut speech_bytes) = (Vec::new(), Vec::new());
    let mut detok = Some(detok);
    for r in 0..args.runs {
        if let Some(t) = &decode_thread {
            t.reset()?;
        }
        let read_before = roof.read();
        let mut session = Session::new(model.backbone.clone())?;
        if args.history > 0 {
            session.prefill_text(&tokens(args.history, vocab, r))?;
        }
        let t0 = Instant::now();
        let audio = model.audio.embed(&wave)?;
        let t_enc = t0.elapsed().as_secs_f64();
        let tok = &model.tokenizer;
        let chat = audio_chat(tok, super::chat::DEFAULT_SYSTEM, audio)?;
        let hidden = if args.history == 0 {
            prefill_chat(&mut session, &chat)?
        } else {
            // The whole turn after the history.
            let emb = chat.embeddings(session.model(), 0)?;
            let h = session.prefill(&emb, chat.items())?;
            h.get(h.dim(0)? - 1)?
        };
        let t_prefill = t0.elapsed().as_secs_f64();
        let mode = GenerationMode::Interleaved {
            n_text: model.config.interleaved_n_text,
            n_audio: model.config.interleaved_n_audio,
        };
        let params = GenerationParams {
            max_new_tokens: usize::MAX,
            text: SamplingParams::GREEDY,
            audio: SamplingParams::new(Some(1.0), Some(4)),
            seed: r as u64,
        };
        let generation = Generation::new(
            model.audio_head.clone(),
            tok.special(),
            mode,
            params,
            hidden,
        );
        // Inline, the stream decodes; with a decoder thread it yields the frames only.
        let inline = decode_thread.is_none();
        let mut stream = ReplyStream::new(generation, if inline { detok.take() } else { None });
        let mut first: Option<(f64, f64)> = None;
        let target_frames = (args.speech_seconds * 12.5).round() as usize;
        let mut frames = 0usize;
        // Frames handed to the decoder thread whose samples have not come back yet.
        let mut in_flight = 0usize;
        let mut gen_start = None;
        // When the last audible frame was generated, while its samples are awaited (inline).
        let mut before_detok = None;
        let (mut text_steps, mut frame_steps) = (0usize, 0usize);
        while frames < target_frames {
            let event = stream.next(&mut session)?;
            // Counted over the span the real-time factor times.
            if gen_start.is_some() {
                match event {
                    StreamEvent::Text(_) => text_steps += 1,
                    StreamEvent::Frame { .. } => frame_steps += 1,
                    _ => {}
                }
            }
            match event {
                // A random model may end its reply; the measurement continues with another.
                StreamEvent::End(_) => break,
                StreamEvent::Text(_) | StreamEvent::Frame { audible: false, .. } => {}
                StreamEvent::Pcm(_) => {
                    // The samples of a frame (not the flush at the end of a reply).
                    if let Some(before) = before_detok.take() {
                        frames += 1;
                        if first.is_none() {
                            first = Some((before, t0.elapsed().as_secs_f64()));
                            gen_start = Some(Instant::now());
                        }
                    }
                }
                StreamEvent::Frame {
                    frame,
                    audible: true,
                } => {
                    let before = t0.elapsed().as_secs_f64();
                    let Some(t) = &decode_thread else {
                        before_detok = Some(before);
                        continue;
                    };
                    t.push(frame)?;
                    in_flight += 1;
                    // The first frame is waited for (time to first audio); later ones are
                    // collected as they are ready.
                    if first.is_none() {
                        decoded(t)?;
                        in_flight -= 1;
                    }
                    while in_flight > 0 {
                        match t.try_recv() {
                            Some(codec::Decoded::Samples(s)) => {
                                t.recycle(s);
                                in_flight -= 1;
                            }
                            Some(codec::Decoded::Failed(e)) => return Err(e.into()),
                            Some(other) => anyhow::bail!("unexpected reply: {other:?}"),
                            None => break,
                        }
                    }
                    frames += 1;
                    if first.is_none() {
                        first = Some((before, t0.elapsed().as_secs_f64()));
                        gen_start = Some(Instant::now());
                    }
                }
            }
        }
        if let Some(d) = stream.into_detokenizer() {
            detok = Some(d);
        }
        if let Some(t) = &decode_thread {
            // Real time means the audio is decoded too.
            for _ in 0..in_flight {
                decoded(t)?;
            }
        }
        if let (Some((first_frame, first_audio)), Some(gs)) = (first, gen_start) {
            ttfa.push(first_audio);
            stages.push([
                t_enc,
                t_prefill - t_enc,
                first_frame - t_prefill,
                first_audio - first_frame,
            ]);
            if frames > 1 {
                let speech_s = (frames - 1) as f64 * 0.08;
                rtf.push(gs.elapsed().as_secs_f64() / speech_s);
                let per_second =
                    (text_steps as f64 * step_bytes + frame_steps as f64 * frame_bytes) / speech_s;
                let read = (read_before + roof.read()) / 2.0;
                floors.push(per_second / 1e9 / read);
                speech_bytes.push(per_second);
            }
        }
    }
    if !ttfa.is_empty() {
        let stage = |i: usize| median(stages.iter().map(|s| s[i] * 1e3).collect());
        rows.push(Row {
            name: "time to first audio",
            value: median(ttfa),
            unit: "s",
            note: format!(
                "after a {:.0} s utterance{}: encoder {:.0} ms, prefill {:.0} ms, text + first frame {:.0} ms, detokenizer {:.0} ms",
                args.utterance_seconds,
                history_note(args.history),
                stage(0),
                stage(1),
                stage(2),
                stage(3)
            ),
        });
    }
    if !rtf.is_empty() {
        rows.push(Row {
            name: "real-time factor",
            value: median(rtf),
            unit: "x",
            note: format!(
                "interleaved speech-to-speech over {:.0} s of speech{}, detokenizer {} (< 1 is faster than real time)",
                args.speech_seconds,
                history_note(args.history),
                match args.detokenizer {
                    DetokenizerPlacement::Inline => "inline",
                    DetokenizerPlacement::Thread => "on its own thread",
                }
            ),
        });
    }
    if let Some(bytes) = roof.peak_rss() {
        rows.push(Row {
            name: "peak RSS",
            value: bytes as f64 / 1e9,
            unit: "GB",
            note: "whole process so far, without the read-rate buffer".into(),
        });
    }
    if let Some(bytes) = roof.huge_before {
        rows.push(Row {
            name: "in huge pages",
            value: bytes as f64 / 1e9,
            unit: "GB",
            note: "memory in 2 MiB pages (the weights, where the system allows; fewer TLB misses)"
                .into(),
        });
    }

    // The memory roofline.
    let (lo, hi) = roof
        .rates
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    rows.push(Row {
        name: "read bandwidth",
        value: median(roof.rates.clone()),
        unit: "GB/s",
        note: format!(
            "plain read of 512 MB with {} threads before and after every timed run: {} reads, \
             {lo:.0}-{hi:.0}",
            pool.len(),
            roof.rates.len()
        ),
    });
    rows.push(Row {
        name: "text decode / roofline",
        value: median(text_share),
        unit: "%",
        note: format!(
            "{:.0} MB of weights per step / step time / read bandwidth of its run",
            step_bytes / 1e6
        ),
    });
    rows.push(Row {
        name: "depthformer / roofline",
        value: median(depth_share),
        unit: "%",
        note: format!(
            "{:.0} MB of weights per frame (its layers once per codebook) / depthformer time / \
             read bandwidth of its run; over 100 % where the caches hold part of them",
            depth_bytes / 1e6
        ),
    });
    if !floors.is_empty() {
        rows.push(Row {
            name: "real-time factor floor",
            value: median(floors),
            unit: "x",
            note: format!(
                "{:.1} GB of weights read per second of speech / read bandwidth of its turn: the \
                 real-time factor of the reads alone",
                median(speech_bytes) / 1e9
            ),
        });
    }
    drop(roof);

    // Agreement of quantized greedy decoding with f32.
    if args.agreement_steps > 0 && args.runtime.quant != Quant::F32 {
        let Agreement {
            text,
            audio,
            logits_mean,
            logits_max,
            text_steps,
        } = agreement(&model, &model_dir, args.agreement_steps)?;
        rows.push(Row {
            name: "text logits error vs f32",
            value: logits_mean * 100.0,
            unit: "%",
            note: format!(
                "mean over {text_steps} text steps of |logits - f32| / |f32 logits| (L2), max {:.2} %",
                logits_max * 100.0
            ),
        });
        rows.push(Row {
            name: "top-1 agreement, text",
            value: text * 100.0,
            unit: "%",
            note: format!(
                "vs f32, teacher-forced, {} greedy steps",
                args.agreement_steps
            ),
        });
        rows.push(Row {
            name: "top-1 agreement, audio",
            value: audio * 100.0,
            unit: "%",
            note: "vs f32, per codebook".into(),
        });
    }

    if args.peer && args.runtime.quant != Quant::F32 {
        let format = match args.runtime.quant {
            Quant::Q8 => lfm2_audio::quant::Format::Q8_0,
            _ => lfm2_audio::quant::Format::Q4_0,
        };
        let work = std::env::temp_dir().join(format!("lfm2d-peer-{}", std::process::id()));
        let peer = crate::bench_peer::candle_quantized_lfm2(
            &model_dir,
            format,
            args.prefill_tokens,
            32,
            args.runs,
            &work,
        );
        let _ = std::fs::remove_dir_all(&work);
        match peer {
            Ok(p) => {
                rows.push(Row {
                    name: "peer prefill",
                    value: p.prefill_tok_s,
                    unit: "tok/s",
                    note: format!("candle-transformers quantized_lfm2, {format}"),
                });
                rows.push(Row {
                    name: "peer text decode",
                    value: p.decode_tok_s,
                    unit: "step/s",
                    note: format!("candle-transformers quantized_lfm2, {format}"),
                });
            }
            Err(e) => eprintln!("bench: the candle peer could not run: {e:#}"),
        }
    }

    println!("| measurement | median | unit | notes |");
    println!("| --- | ---: | --- | --- |");
    for r in &rows {
        let value = if r.value >= 100.0 {
            format!("{:.0}", r.value)
        } else if r.value >= 1.0 {
            format!("{:.2}", r.value)
        } else {
            format!("{:.3}", r.value)
        };
        println!("| {} | {value} | {} | {} |", r.name, r.unit, r.note);
    }
    println!();
    println!(
        "machine: {}, {} threads, kernel {}",
        cpu_model(),
        pool.len(),
        pool.kernel()
    );
    if args.json {
        let obj: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| {
                (
                    r.name.to_string(),
                    serde_json::json!({"value": r.value, "unit": r.unit}),
                )
            })
            .collect();
        println!("{}", serde_json::Value::Object(obj));
    }
    Ok(())
}

/// Greedy interleaved decoding of the f32 model, with the quantized model fed the same items
/// (teacher forcing): the share of steps where the quantized model's own top-1 choice agrees,
/// for text tokens and for audio codes (per codebook).
/// How closely a quantized model follows f32 (see [`agreement`]).
struct Agreement {
    /// Share of text steps whose top-1 token is f32's.
    text: f64,
    /// Share of audio codes that are f32's.
    audio: f64,
    /// Mean and largest relative L2 distance of the text logits from f32's.
    logits_mean: f64,
    logits_max: f64,
    text_steps: usize,
}

fn agreement(quant: &Lfm2AudioModel, dir: &Path, steps: usize) -> anyhow::Result<Agreement> {
    let exact = RuntimeArgs {
        quant: Quant::F32,
        threads: None,
    }
    .load(dir)?;
    let tok = &exact.tokenizer;
    let chat = ChatState::text_chat(
        tok,
        Some(super::chat::DEFAULT_SYSTEM),
        "Tell me something about the sea, please.",
    )?;
    let mut ref_session = Session::new(exact.backbone.clone())?;
    let mut q_session = Session::new(quant.backbone.clone())?;
    let ref_hidden = prefill_chat(&mut ref_session, &chat)?;
    let mut q_hidden = prefill_chat(&mut q_session, &chat)?;
    let mode = GenerationMode::Interleaved {
        n_text: exact.config.interleaved_n_text,
        n_audio: exact.config.interleaved_n_audio,
    };
    let params = GenerationParams {
        max_new_tokens: steps,
        text: SamplingParams::GREEDY,
        audio: SamplingParams::GREEDY,
        seed: 0,
    };
    let mut gen = Generator::new(
        &mut ref_session,
        &exact.audio_head,
        tok.special(),
        mode,
        params,
        ref_hidden,
    );
    let (mut text_same, mut text_n, mut codes_same, mut codes_n) = (0usize, 0usize, 0usize, 0usize);
    let mut logit_errors = Vec::new();
    let mut greedy = Sampler::new(SamplingParams::GREEDY, 0);
    while let Some(token) = gen.next_item()? {
        match &token {
            Token::Text(id) => {
                let logits = quant
                    .backbone
                    .text_logits(&q_hidden.unsqueeze(0)?)?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                text_same += usize::from(argmax(&logits) == *id);
                text_n += 1;
                if let Some(h) = gen.last_hidden() {
                    let exact = exact
                        .backbone
                        .text_logits(&h.unsqueeze(0)?)?
                        .squeeze(0)?
                        .to_vec1::<f32>()?;
                    let (mut d2, mut r2) = (0f64, 0f64);
                    for (&a, &b) in logits.iter().zip(&exact) {
                        d2 += (a as f64 - b as f64).powi(2);
                        r2 += (b as f64).powi(2);
                    }
                    logit_errors.push((d2 / r2.max(f64::MIN_POSITIVE)).sqrt());
                }
                q_hidden = q_session.step_text(*id)?;
            }
            Token::Audio(frame) => {
                let mine = quant.audio_head.sample_frame(&q_hidden, &mut greedy)?;
                // The reference turns a frame whose first code is end-of-audio into all 2048.
                let eoa = ends_audio(&mine);
                for (c, (&a, &b)) in mine.iter().zip(frame).enumerate() {
                    let a = if eoa && c > 0 { END_OF_AUDIO } else { a };
                    codes_same += usize::from(a == b);
                    codes_n += 1;
                }
                q_hidden =
                    q_session.step(&quant.audio_head.frame_embedding(frame)?, Item::AudioOut)?;
            }
        }
    }
    let ratio = |a: usize, n: usize| {
        if n == 0 {
            f64::NAN
        } else {
            a as f64 / n as f64
        }
    };
    let n = logit_errors.len();
    Ok(Agreement {
        text: ratio(text_same, text_n),
        audio: ratio(codes_same, codes_n),
        logits_mean: logit_errors.iter().sum::<f64>() / n.max(1) as f64,
        logits_max: logit_errors.iter().copied().fold(0.0, f64::max),
        text_steps: n,
    })
}
