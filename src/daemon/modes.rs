//! The daemon's other modes: live transcription and translation of what the microphone hears,
//! and reading lines of stdin aloud.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::Context;
use audio_io::echo::{EchoMode, EchoReference};
use audio_io::vad::VadEvent;
use audio_io::{ListenEvent, Player};
use crossbeam_channel::{select, Receiver};
use lfm2_audio::format::OUTPUT_SAMPLE_RATE;
use lfm2_audio::sampling::SamplingParams;
use std::time::Instant;

use super::console::{pump, signal_name, stamp};
use super::setup::{device, listen, sampling, Args, Mode, Resolved};
use crate::config::Config;
use crate::engine::{Content, ConvEvent, EngineHandle, Output, Respond, Setup, ToolPolicy};

/// Appends a line to the transcript file, if there is one.
struct Transcript(Option<std::fs::File>);

impl Transcript {
    fn open(cfg: &Config) -> anyhow::Result<Self> {
        if cfg.assistant.transcript_file.is_empty() {
            return Ok(Self(None));
        }
        let path = &cfg.assistant.transcript_file;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the transcript file {path}"))?;
        Ok(Self(Some(file)))
    }

    fn line(&mut self, start: Instant, line: &str) {
        println!("{line}");
        let _ = std::io::stdout().flush();
        if let Some(f) = &mut self.0 {
            if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                eprintln!("{} transcript file: {e}", stamp(start));
            }
        }
    }
}

/// Text on one line (a transcript line is one utterance).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn clock(d: Duration) -> String {
    let s = d.as_secs_f64();
    format!(
        "{:02}:{:02}:{:05.2}",
        (s / 3600.0) as u64,
        (s / 60.0) as u64 % 60,
        s % 60.0
    )
}

/// Live transcription, or translation: each utterance on its own, with its timestamps.
pub(crate) fn transcribe_or_translate(
    args: &Args,
    r: &Resolved,
    engine: &EngineHandle,
    stop: &Receiver<i32>,
) -> anyhow::Result<()> {
    let (cfg, start) = (&r.cfg, r.start);
    let translate = r.mode == Mode::Translate;
    let lang = cfg.assistant.translate_to.trim();
    let spoken = translate && cfg.assistant.speak_translation;
    let conv = engine.open(Setup {
        instructions: if translate {
            format!("Translate what the user says into {lang}. Answer with the translation only.")
        } else {
            String::new()
        },
        tools: Vec::new(),
        tool_policy: ToolPolicy::Report,
        params: sampling(cfg),
        output: if spoken { Output::Speech } else { Output::Text },
    })?;
    let mut out = Transcript::open(cfg)?;
    let mut player = if spoken {
        Some(Player::open(
            &device(args.output.as_deref(), &cfg.audio.output)?,
            None,
        )?)
    } else {
        None
    };
    // Transcription has no playback, so nothing to echo; spoken translations are not
    // interrupted (half duplex keeps the microphone from hearing them).
    let reference = player
        .as_ref()
        .map(|_| EchoReference::new(OUTPUT_SAMPLE_RATE))
        .transpose()?;
    if let (Some(p), Some(rf)) = (player.as_mut(), reference.as_ref()) {
        p.set_reference(rf.clone());
    }
    let r2 = Resolved {
        cfg: r.cfg.clone(),
        mode: r.mode,
        echo: if spoken {
            EchoMode::HalfDuplex
        } else {
            EchoMode::Off
        },
        start,
    };
    let listener = listen(args, &r2, reference)?;
    eprintln!(
        "{} {} (Ctrl-C to stop)",
        stamp(start),
        if translate {
            format!("translating into {lang}")
        } else {
            "transcribing".into()
        }
    );
    let deadline = args
        .seconds
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let mut n = 0u64;
    let mut spans: std::collections::HashMap<String, (Duration, Duration)> = Default::default();
    let mut done = 0u64;
    let mut text = String::new();
    let mut signal = None;
    loop {
        select! {
            recv(stop) -> sig => {
                signal = Some(sig.unwrap_or(0));
                break;
            }
            recv(listener.events()) -> ev => match ev {
                Ok(ListenEvent::Vad { event: VadEvent::SpeechEnded { started, at, audio, .. }, .. }) => {
                    n += 1;
                    let id = format!("utterance-{n}");
                    spans.insert(id.clone(), (started, at));
                    if translate {
                        conv.add(id.clone(), Content::UserAudio(audio));
                        conv.respond(Respond { response_id: id.clone(), item_id: format!("{id}-reply"), output: None });
                    } else {
                        conv.transcribe(id, audio);
                    }
                }
                Ok(ListenEvent::Stopped { error, .. }) => {
                    if let Some(e) = error {
                        eprintln!("{} capture stopped: {e}", stamp(start));
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            },
            recv(conv.events()) -> ev => match ev {
                Ok(ConvEvent::Transcript { item_id, text }) => {
                    let (a, b) = spans.remove(&item_id).unwrap_or_default();
                    out.line(start, &format!("[{} --> {}] {}", clock(a), clock(b), one_line(&text)));
                    done += 1;
                }
                Ok(ConvEvent::Text { piece, .. }) => text.push_str(&piece),
                Ok(ConvEvent::Audio { samples, .. }) => {
                    if let Some(p) = player.as_mut() {
                        p.queue(&samples);
                    }
                }
                Ok(ConvEvent::ReplyDone { response_id, item_id, .. }) => {
                    let (a, b) = spans.remove(&response_id).unwrap_or_default();
                    out.line(start, &format!("[{} --> {}] ({lang}) {}", clock(a), clock(b), one_line(&std::mem::take(&mut text))));
                    // Each utterance stands alone.
                    conv.delete(item_id);
                    conv.delete(response_id);
                    done += 1;
                }
                Ok(ConvEvent::Error { message, .. }) => {
                    eprintln!("{} error: {message}", stamp(start));
                    done += 1;
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        if let Some(p) = player.as_mut() {
            pump(p, true, start);
        }
        if args.max_turns.is_some_and(|m| done >= m) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    conv.cancel(Some(0));
    listener.stop();
    if let Some(mut p) = player {
        if signal.is_some() {
            p.clear();
        }
        p.close();
    }
    eprintln!(
        "{} stopped after {done} utterances{}",
        stamp(start),
        signal.map_or(String::new(), |s| format!(" ({})", signal_name(s)))
    );
    Ok(())
}

/// Reads lines of stdin aloud.
pub(crate) fn speak(
    args: &Args,
    r: &Resolved,
    engine: &EngineHandle,
    stop: &Receiver<i32>,
) -> anyhow::Result<()> {
    let (cfg, start) = (&r.cfg, r.start);
    let voice = crate::voices::find(&cfg.assistant.voice, None)?;
    let mut params = sampling(cfg);
    params.audio = SamplingParams::new(voice.audio_temperature, voice.audio_top_k);
    let conv = engine.open(Setup {
        instructions: voice.system_prompt.clone(),
        tools: Vec::new(),
        tool_policy: ToolPolicy::Report,
        params,
        output: Output::Tts,
    })?;
    let mut player = Player::open(&device(args.output.as_deref(), &cfg.audio.output)?, None)?;
    eprintln!(
        "{} reading stdin aloud with the {} voice",
        stamp(start),
        voice.name
    );
    let (lines_tx, lines) = crossbeam_channel::unbounded::<String>();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        })?;
    let mut asked = 0u64;
    let mut done = 0u64;
    let mut eof = false;
    let mut signal = None;
    loop {
        let lines_rx: Receiver<String> = if eof {
            crossbeam_channel::never()
        } else {
            lines.clone()
        };
        select! {
            recv(stop) -> sig => {
                signal = Some(sig.unwrap_or(0));
                break;
            }
            recv(lines_rx) -> line => match line {
                Ok(line) if line.trim().is_empty() => {}
                Ok(line) => {
                    asked += 1;
                    let id = format!("line-{asked}");
                    conv.add(id.clone(), Content::UserText(line));
                    conv.respond(Respond { response_id: id.clone(), item_id: format!("{id}-speech"), output: None });
                }
                Err(_) => eof = true,
            },
            recv(conv.events()) -> ev => match ev {
                Ok(ConvEvent::Audio { samples, .. }) => player.queue(&samples),
                Ok(ConvEvent::ReplyDone { response_id, item_id, text, audio_samples, .. }) => {
                    println!("{} said {text:?} ({:.2} s)", stamp(start), audio_samples as f64 / 24_000.0);
                    conv.delete(item_id);
                    conv.delete(response_id);
                    done += 1;
                }
                Ok(ConvEvent::Error { message, .. }) => {
                    eprintln!("{} error: {message}", stamp(start));
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        pump(&mut player, done == asked, start);
        if eof && done == asked && player.idle() {
            break;
        }
        if args.max_turns.is_some_and(|m| done >= m) && player.idle() {
            break;
        }
    }
    conv.cancel(Some(0));
    if signal.is_some() {
        player.clear();
    }
    player.close();
    eprintln!(
        "{} stopped after {done} lines{}",
        stamp(start),
        signal.map_or(String::new(), |s| format!(" ({})", signal_name(s)))
    );
    Ok(())
}
