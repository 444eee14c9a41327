//! The voice assistant (`lfm2d serve`, the default mode): microphone → echo canceller → VAD →
//! user turn → interleaved generation → streaming detokenizer → speaker, continuously, over many
//! turns, with barge-in and tool calls.
//!
//! Threads: the capture pump (audio-io's `Listener`), the engine (the model, `crate::engine`),
//! and this loop, which runs the turn state machine, feeds the player, and prints the
//! conversation.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use audio_io::echo::{EchoMode, EchoReference};
use audio_io::vad::VadEvent;
use audio_io::{ListenEvent, Player};
use crossbeam_channel::{select, Receiver};
use dialog::assistant::{Assistant, Effect, Input, SpeakerState};
use dialog::turn::TurnState;
use lfm2_audio::format::{INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, SAMPLES_PER_FRAME};

use super::console::{log, pump, say, signal_name, stamp, uptime_of, OPEN_LINE};
use super::setup::{device, listen, sampling, tools, Args, Resolved};
use crate::engine::{Call, ConvEvent, Conversation, EngineHandle, Output, Setup, ToolPolicy};

/// A short two-tone chime (24 kHz) for timers.
fn chime() -> Vec<f32> {
    let mut out = Vec::new();
    for (f, n) in [(880.0f32, 4800), (1320.0, 7200)] {
        for i in 0..n {
            let t = i as f32 / OUTPUT_SAMPLE_RATE as f32;
            let env = (1.0 - i as f32 / n as f32).min(i as f32 / 240.0);
            out.push(0.25 * env * (2.0 * std::f32::consts::PI * f * t).sin());
        }
    }
    out
}

pub(crate) fn assistant(
    args: &Args,
    r: &Resolved,
    engine: &EngineHandle,
    stop: &Receiver<i32>,
) -> anyhow::Result<()> {
    let (cfg, start) = (&r.cfg, r.start);
    let tool_policy = ToolPolicy::Run {
        max_rounds: cfg.assistant.max_tool_rounds,
    };
    let conv = engine.open(Setup {
        instructions: cfg.assistant.system_prompt.clone(),
        tools: tools(cfg),
        tool_policy,
        params: sampling(cfg),
        output: Output::Speech,
    })?;
    let reference = match r.echo {
        EchoMode::Off => None,
        _ => Some(EchoReference::new(OUTPUT_SAMPLE_RATE)?),
    };
    let listener = listen(args, r, reference.clone())?;
    let mut player = Player::open(
        &device(args.output.as_deref(), &cfg.audio.output)?,
        reference,
    )?;
    // The dialog: turn-taking, barge-in, tool rounds and the items of the conversation.
    let mut dialog = Assistant::new(
        r.echo == EchoMode::HalfDuplex,
        cfg.assistant.transcribe_user,
    )
    .speculative(cfg.assistant.speculative_start)
    .tool_policy(tool_policy);
    let mut run = Run {
        start,
        conv: &conv,
        spoke_at: None,
        question_end: None,
        pending_end: None,
        delays: Vec::new(),
        transcripts: 0,
        held_audio: None,
        made_at: VecDeque::new(),
        stop_after: args.max_turns,
        finished: false,
    };
    run.apply(
        dialog.handle(Input::Start, speaker(&mut player)),
        &mut player,
    );
    eprintln!(
        "{} listening, echo handling {} (say something; Ctrl-C to stop)",
        stamp(start),
        r.echo
    );
    let mut signal: Option<i32> = None;
    let deadline = args
        .seconds
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    loop {
        let mut input = None;
        let mut utterance_ended = false;
        select! {
            recv(stop) -> sig => {
                signal = Some(sig.unwrap_or(0));
                break;
            }
            recv(listener.events()) -> ev => match ev {
                Ok(ListenEvent::Vad { event: VadEvent::SpeechStarted { at }, decided, latency }) => {
                    say(format!(
                        "{} user: (speaking since {:.2}s)",
                        stamp(start),
                        uptime_of(start, at, decided, latency)
                    ));
                    input = Some(Input::SpeechStarted { at });
                }
                Ok(ListenEvent::Vad { event: VadEvent::SpeechEnded { at, audio, .. }, decided, latency }) => {
                    let ended = uptime_of(start, at, decided, latency);
                    say(format!(
                        "{} user: ({:.2} s of speech, ended at {ended:.2}s)",
                        stamp(start),
                        audio.len() as f64 / f64::from(INPUT_SAMPLE_RATE)
                    ));
                    run.spoke_at = Some(Instant::now());
                    run.pending_end = Some(ended);
                    input = Some(Input::SpeechEnded { at, audio });
                    utterance_ended = true;
                }
                Ok(ListenEvent::Vad { event: VadEvent::SpeechPaused { audio, .. }, .. }) => {
                    input = Some(Input::SpeechPaused { audio });
                }
                Ok(ListenEvent::Vad { event: VadEvent::SpeechResumed { .. }, .. }) => {
                    if dialog.speculating() {
                        log(format!(
                            "{} user: went on after a pause; the reply started on it is dropped",
                            stamp(start)
                        ));
                    }
                    input = Some(Input::SpeechResumed);
                }
                Ok(ListenEvent::Stopped { error, .. }) => {
                    if let Some(e) = error {
                        log(format!("{} capture stopped: {e}", stamp(start)));
                    }
                    break;
                }
                Ok(ListenEvent::Device(e)) => log(format!("{} input device: {e}", stamp(start))),
                Ok(_) => {}
                Err(_) => break,
            },
            recv(conv.events()) -> ev => match ev {
                Ok(ev) => {
                    run.note_held_audio(&ev, dialog.speculative_response());
                    input = Some(Input::Engine(ev));
                }
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        if let Some(input) = input {
            run.apply(dialog.handle(input, speaker(&mut player)), &mut player);
        }
        if utterance_ended && dialog.state() == TurnState::Responding {
            // The utterance is being answered (started now, or on its last pause).
            run.question_end = run.pending_end.take();
        }
        pump(&mut player, dialog.reply_done(), start);
        run.measure(dialog.reply_base(), &player);
        run.apply(
            dialog.handle(Input::Tick, speaker(&mut player)),
            &mut player,
        );
        if run.finished || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    // At the end of a scripted session (--max-turns, --seconds) the last words still to be
    // transcribed are waited for, a few seconds at most, so that the log is complete; a signal
    // does not wait.
    let wait_until = Instant::now() + Duration::from_secs(10);
    while signal.is_none() && run.transcripts > 0 && Instant::now() < wait_until {
        select! {
            recv(stop) -> sig => signal = Some(sig.unwrap_or(0)),
            recv(conv.events()) -> ev => match ev {
                Ok(ev @ ConvEvent::Transcript { .. }) => run.show(&ev, &mut player),
                Ok(ev @ ConvEvent::Error { .. }) => {
                    run.transcripts -= 1;
                    run.show(&ev, &mut player);
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(100)) => {}
        }
    }
    // Stop at once: nothing more is played or generated.
    run.apply(dialog.stop(), &mut player);
    if signal.is_some() {
        player.clear();
    }
    listener.stop();
    let stats = player.stats();
    player.close();
    let mut delays = run.delays;
    delays.sort_by(f64::total_cmp);
    let latency = match delays.as_slice() {
        [] => String::new(),
        d => format!(
            "; answers audible {:.0} ms (median) / {:.0} ms (max) after the question",
            d[d.len() / 2] * 1e3,
            d[d.len() - 1] * 1e3
        ),
    };
    log(format!(
        "{} stopped after {} replies{}: {} user turns, {} barge-ins, {} playback underruns{latency}",
        stamp(start),
        dialog.replies(),
        match signal {
            Some(sig) => format!(" ({})", signal_name(sig)),
            None => String::new(),
        },
        dialog.user_turns(),
        dialog.barge_ins(),
        stats.xruns + stats.device_xruns
    ));
    Ok(())
}

/// Where the speaker is, for the dialog.
fn speaker(player: &mut Player) -> SpeakerState {
    SpeakerState {
        played: player.played(),
        queued: player.queued_end(),
        idle: player.idle(),
    }
}

/// The voice loop's side of the dialog: it makes the dialog's effects happen (the engine calls,
/// the speaker) and keeps the log (the conversation on stdout, the latencies).
struct Run<'a> {
    start: Instant,
    conv: &'a Conversation,
    /// When the last utterance ended (for the time to the first audio).
    spoke_at: Option<Instant>,
    /// Uptime of the last voiced sample of the utterance being answered, until the answer's
    /// first sample has been played; of the last utterance heard; and the delays so far.
    question_end: Option<f64>,
    pending_end: Option<f64>,
    delays: Vec<f64>,
    /// Transcripts asked for and not yet received.
    transcripts: u32,
    /// When each piece of audio of the speculative reply (this response id) came from the
    /// engine: the dialog holds them back until the turn is confirmed.
    held_audio: Option<(String, VecDeque<Instant>)>,
    /// For the reply just begun: when its held-back pieces of audio were made, in order.
    made_at: VecDeque<Instant>,
    /// Stop after this many replies.
    stop_after: Option<u64>,
    finished: bool,
}

impl Run<'_> {
    /// Notes when a piece of audio of the speculative reply `speculative` came: the dialog
    /// holds it back until the end of the silence confirms the turn.
    fn note_held_audio(&mut self, ev: &ConvEvent, speculative: Option<&str>) {
        let (ConvEvent::Audio { response_id, .. }, Some(spec)) = (ev, speculative) else {
            return;
        };
        if response_id != spec {
            return;
        }
        match &mut self.held_audio {
            Some((id, made)) if id == spec => made.push_back(Instant::now()),
            held => *held = Some((spec.to_string(), VecDeque::from([Instant::now()]))),
        }
    }

    fn apply(&mut self, effects: Vec<Effect>, player: &mut Player) {
        let start = self.start;
        for effect in effects {
            match effect {
                Effect::Engine(call) => {
                    if let Call::TranscribeWhenIdle { .. } = &call {
                        self.transcripts += 1;
                    }
                    self.conv.apply(call.widen());
                }
                Effect::BeginReply { response_id } => {
                    let line = format!("{} assistant: ", stamp(start));
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "{line}");
                    let _ = out.flush();
                    OPEN_LINE.store(true, Ordering::Relaxed);
                    player.begin_reply();
                    // A confirmed speculative reply: its audio so far was made during the
                    // silence, and is paced from then.
                    self.made_at = match &mut self.held_audio {
                        Some((id, made)) if *id == response_id => std::mem::take(made),
                        _ => VecDeque::new(),
                    };
                }
                Effect::Text(piece) => {
                    let mut out = std::io::stdout().lock();
                    if !OPEN_LINE.swap(true, Ordering::Relaxed) {
                        // The line was ended by another one in between: go on after a stamp.
                        let _ = write!(
                            out,
                            "[{:>8.2}s] assistant: ...",
                            start.elapsed().as_secs_f64()
                        );
                    }
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
                Effect::Audio(samples) => {
                    if let Some(t) = self.spoke_at.take() {
                        log(format!(
                            "{} first audio {:.0} ms after the end of speech",
                            stamp(start),
                            t.elapsed().as_secs_f64() * 1e3
                        ));
                    }
                    match self.made_at.pop_front() {
                        Some(made) => player.reply_audio_made_at(&samples, made),
                        None => player.reply_audio(&samples),
                    }
                }
                Effect::StopPlayback => player.clear(),
                Effect::BargeIn { heard } => {
                    if heard == 0 {
                        say(format!(
                            "{} barge-in: nothing of the reply had been heard yet; it is dropped",
                            stamp(start)
                        ));
                    } else {
                        say(format!(
                            "{} barge-in: the assistant is cut after {:.2} s of its reply",
                            stamp(start),
                            heard as f64 / f64::from(OUTPUT_SAMPLE_RATE)
                        ));
                    }
                    self.question_end = None;
                }
                Effect::ReplyPlayed { cut } => {
                    let notes = player.end_reply();
                    let how = if cut {
                        "reply played (cut)"
                    } else {
                        "reply played"
                    };
                    log(format!("{} {how}: {notes}", stamp(start)));
                }
                Effect::ReplyOver { replies } => {
                    if self.stop_after.is_some_and(|m| replies >= m) {
                        self.finished = true;
                    }
                }
                Effect::Report(ev) => self.show(&ev, player),
            }
        }
    }

    /// Logs an engine event that is news by itself (the dialog reports them as they count).
    fn show(&mut self, ev: &ConvEvent, player: &mut Player) {
        let start = self.start;
        match ev {
            ConvEvent::ToolCall {
                name,
                arguments,
                call_id,
                ..
            } => {
                say(format!(
                    "{} tool call {call_id}: {name}({arguments})",
                    stamp(start)
                ));
            }
            ConvEvent::ToolResult {
                call_id,
                output,
                ok,
                ..
            } => {
                say(format!(
                    "{} tool result {call_id} ({}): {output}",
                    stamp(start),
                    if *ok { "ok" } else { "failed" }
                ));
            }
            ConvEvent::TimerFired { label } => {
                say(format!("{} timer: {label:?} is done", stamp(start)));
                player.queue(&chime());
                pump(player, true, start);
            }
            ConvEvent::ReplyDone {
                text,
                audio_samples,
                cancelled,
                ..
            } => {
                let frames = audio_samples / SAMPLES_PER_FRAME as u64;
                say(format!(
                    "{} assistant {}: {text:?} ({frames} frames, {:.2} s of speech)",
                    stamp(start),
                    if *cancelled {
                        "(interrupted, kept)"
                    } else {
                        "(done)"
                    },
                    *audio_samples as f64 / f64::from(OUTPUT_SAMPLE_RATE)
                ));
            }
            ConvEvent::Transcript { item_id, text } => {
                self.transcripts = self.transcripts.saturating_sub(1);
                say(format!("{} user ({item_id}): {text:?}", stamp(start)));
            }
            ConvEvent::Truncated {
                item_id,
                audio_samples,
                text,
            } => {
                say(format!(
                    "{} assistant (interrupted, kept): {text:?} ({} frames, {:.2} s of speech; {item_id})",
                    stamp(start),
                    audio_samples / SAMPLES_PER_FRAME as u64,
                    *audio_samples as f64 / f64::from(OUTPUT_SAMPLE_RATE)
                ));
            }
            ConvEvent::Trimmed { item_ids } => {
                say(format!(
                    "{} context full: dropped the {} oldest items",
                    stamp(start),
                    item_ids.len()
                ));
            }
            ConvEvent::Error { message, .. } => {
                // Every reply ends with ReplyDone, failed ones too: this is only news.
                log(format!("{} error: {message}", stamp(start)));
            }
            _ => {}
        }
    }

    /// Once the first sample of the answer has been played: how long after the end of the
    /// question it was heard.
    fn measure(&mut self, reply_base: Option<u64>, player: &Player) {
        let (Some(base), Some(ended)) = (reply_base, self.question_end) else {
            return;
        };
        let played = player.played();
        if played > base {
            // The first sample of the answer went to the device this long ago.
            let start = self.start;
            let heard = start.elapsed().as_secs_f64()
                - (played - base) as f64 / f64::from(OUTPUT_SAMPLE_RATE);
            let delay = heard - ended;
            self.delays.push(delay);
            self.question_end = None;
            log(format!(
                "{} answer audible {:.0} ms after the end of the question (ended at {ended:.2}s, first sample played at {heard:.2}s)",
                stamp(start),
                delay * 1e3
            ));
        }
    }
}
