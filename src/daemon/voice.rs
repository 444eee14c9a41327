//! The voice assistant (`lfm2d serve`, the default mode): microphone → echo canceller → VAD →
//! user turn → interleaved generation → streaming detokenizer → speaker, continuously, over many
//! turns, with barge-in and tool calls.
//!
//! Threads: the capture pump (audio-io's `Listener`), the engine (the model, `crate::engine`),
//! and this loop, which runs the turn state machine, feeds the player, and prints the
//! conversation.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use audio_io::echo::{EchoMode, EchoReference};
use audio_io::vad::VadEvent;
use audio_io::{ListenEvent, Player, PLAYBACK_SOURCE_RATE};
use crossbeam_channel::{select, Receiver};
use dialog::turn::{Action, Event, TurnManager};

use super::console::{log, pump, say, signal_name, stamp, uptime_of, OPEN_LINE};
use super::setup::{device, listen, sampling, tools, Args, Resolved};
use crate::engine::{
    Content, ConvEvent, Conversation, EngineHandle, Output, Respond, Setup, ToolPolicy,
};

/// A short two-tone chime (24 kHz) for timers.
fn chime() -> Vec<f32> {
    let mut out = Vec::new();
    for (f, n) in [(880.0f32, 4800), (1320.0, 7200)] {
        for i in 0..n {
            let t = i as f32 / 24_000.0;
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
    let conv = engine.open(Setup {
        instructions: cfg.assistant.system_prompt.clone(),
        tools: tools(cfg),
        tool_policy: ToolPolicy::Run {
            max_rounds: cfg.assistant.max_tool_rounds,
        },
        params: sampling(cfg),
        output: Output::Speech,
    })?;
    let reference = match r.echo {
        EchoMode::Off => None,
        _ => Some(EchoReference::new(PLAYBACK_SOURCE_RATE)?),
    };
    let listener = listen(args, r, reference.clone())?;
    let mut player = Player::open(
        &device(args.output.as_deref(), &cfg.audio.output)?,
        reference,
    )?;
    let mut turns = TurnManager::new(r.echo == EchoMode::HalfDuplex);
    turns.handle(Event::Start);
    eprintln!(
        "{} listening, echo handling {} (say something; Ctrl-C to stop)",
        stamp(start),
        r.echo
    );

    // The reply in progress, the one that was interrupted (its late events are dropped), and
    // where the reply began in the player's sample count.
    let mut current: Option<String> = None;
    let mut cancelled: Option<String> = None;
    let mut reply_base: Option<u64> = None;
    let mut reply_done = false;
    let mut replies = 0u64;
    let mut barge_ins = 0u64;
    let mut user_turns = 0u64;
    let mut last_user: Option<(String, Vec<f32>)> = None;
    let mut spoke_at: Option<Instant> = None;
    // Uptime of the last voiced sample of the utterance being answered, until the answer's
    // first sample has been played; and the delays measured so far.
    let mut question_end: Option<f64> = None;
    let mut pending_end: Option<f64> = None;
    let mut delays: Vec<f64> = Vec::new();
    let mut tool_round = false;
    let mut heard_at_stop: Option<u64> = None;
    let mut current_item: Option<String> = None;
    let mut signal: Option<i32> = None;
    // Transcripts asked for and not yet received.
    let mut transcripts = 0u32;
    let deadline = args
        .seconds
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let stdout = std::io::stdout();
    loop {
        let mut actions = Vec::new();
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
                    actions = turns.handle(Event::SpeechStarted { at });
                }
                Ok(ListenEvent::Vad { event: VadEvent::SpeechEnded { at, audio, .. }, decided, latency }) => {
                    let ended = uptime_of(start, at, decided, latency);
                    say(format!(
                        "{} user: ({:.2} s of speech, ended at {ended:.2}s)",
                        stamp(start),
                        audio.len() as f64 / 16_000.0
                    ));
                    spoke_at = Some(Instant::now());
                    pending_end = Some(ended);
                    actions = turns.handle(Event::SpeechEnded { at, audio });
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
                Ok(ConvEvent::ReplyStarted { response_id, item_id, latency_ms }) => {
                    current_item = Some(item_id);
                    let _ = latency_ms;
                    let line = format!("{} assistant: ", stamp(start));
                    let mut out = stdout.lock();
                    let _ = write!(out, "{line}");
                    let _ = out.flush();
                    OPEN_LINE.store(true, Ordering::Relaxed);
                    current = Some(response_id);
                    // Where this reply's first sample will be in the player's count.
                    reply_base = Some(player.queued_end());
                    player.begin_reply();
                    reply_done = false;
                    actions = turns.handle(Event::ReplyStarted);
                }
                Ok(ConvEvent::Text { response_id, .. } | ConvEvent::Audio { response_id, .. })
                    if Some(&response_id) == cancelled.as_ref() => {}
                Ok(ConvEvent::Text { piece, .. }) => {
                    let mut out = stdout.lock();
                    if !OPEN_LINE.swap(true, Ordering::Relaxed) {
                        // The line was ended by another one in between: go on after a stamp.
                        let _ = write!(out, "[{:>8.2}s] assistant: ...", start.elapsed().as_secs_f64());
                    }
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
                Ok(ConvEvent::Audio { samples, .. }) => {
                    if let Some(t) = spoke_at.take() {
                        log(format!("{} first audio {:.0} ms after the end of speech", stamp(start), t.elapsed().as_secs_f64() * 1e3));
                    }
                    player.reply_audio(&samples);
                }
                Ok(ConvEvent::ToolCall { name, arguments, call_id, .. }) => {
                    // The answer comes in a reply of its own, after the result.
                    tool_round = true;
                    say(format!("{} tool call {call_id}: {name}({arguments})", stamp(start)));
                }
                Ok(ConvEvent::ToolResult { call_id, output, ok, .. }) => {
                    say(format!("{} tool result {call_id} ({}): {output}", stamp(start), if ok { "ok" } else { "failed" }));
                }
                Ok(ConvEvent::TimerFired { label }) => {
                    say(format!("{} timer: {label:?} is done", stamp(start)));
                    player.queue(&chime());
                    pump(&mut player, true, start);
                }
                Ok(ConvEvent::ReplyDone { response_id, text, audio_samples, cancelled: was_cut, .. }) => {
                    let frames = audio_samples / 1920;
                    say(format!(
                        "{} assistant {}: {text:?} ({frames} frames, {:.2} s of speech)",
                        stamp(start),
                        if was_cut { "(interrupted, kept)" } else { "(done)" },
                        audio_samples as f64 / 24_000.0
                    ));
                    if std::mem::take(&mut tool_round) && !was_cut {
                        // The tool runs, then the model answers: the response goes on.
                    } else if Some(&response_id) == current.as_ref() || current.is_none() {
                        replies += 1;
                        if was_cut {
                            reply_base = None;
                            reply_done = false;
                        } else {
                            reply_done = true;
                        }
                    }
                }
                Ok(ConvEvent::Transcript { item_id, text }) => {
                    transcripts = transcripts.saturating_sub(1);
                    say(format!("{} user ({item_id}): {text:?}", stamp(start)));
                }
                Ok(ConvEvent::Truncated { item_id, audio_samples, text }) => {
                    say(format!(
                        "{} assistant (interrupted, kept): {text:?} ({} frames, {:.2} s of speech; {item_id})",
                        stamp(start),
                        audio_samples / 1920,
                        audio_samples as f64 / 24_000.0
                    ));
                }
                Ok(ConvEvent::Trimmed { item_ids }) => {
                    say(format!("{} context full: dropped the {} oldest items", stamp(start), item_ids.len()));
                }
                Ok(ConvEvent::Error { message, .. }) => {
                    // Every reply ends with ReplyDone, failed ones too: this is only news.
                    log(format!("{} error: {message}", stamp(start)));
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(20)) => {}
        }
        pump(&mut player, reply_done, start);
        if let (Some(base), Some(ended)) = (reply_base, question_end) {
            let played = player.played();
            if played > base {
                // The first sample of the answer went to the device this long ago.
                let heard = start.elapsed().as_secs_f64() - (played - base) as f64 / 24_000.0;
                let delay = heard - ended;
                delays.push(delay);
                question_end = None;
                log(format!(
                    "{} answer audible {:.0} ms after the end of the question (ended at {ended:.2}s, first sample played at {heard:.2}s)",
                    stamp(start),
                    delay * 1e3
                ));
            }
        }
        // The reply is over once it has been generated and played out.
        if reply_done && (reply_base.is_none() || player.idle()) {
            reply_done = false;
            if reply_base.take().is_some() {
                let notes = player.end_reply();
                log(format!("{} reply played: {notes}", stamp(start)));
            }
            actions.extend(turns.handle(Event::ReplyFinished));
            if args.max_turns.is_some_and(|m| replies >= m) {
                break;
            }
        }
        for action in actions {
            match action {
                Action::Respond { audio } => {
                    user_turns += 1;
                    let id = format!("user-{user_turns}");
                    conv.add(id.clone(), Content::UserAudio(audio.clone()));
                    respond(&conv, user_turns);
                    question_end = pending_end.take();
                    if cfg.assistant.transcribe_user {
                        // The engine runs it when nothing else waits: the words are for the log.
                        conv.transcribe_when_idle(id.clone(), audio.clone());
                        transcripts += 1;
                    }
                    last_user = Some((id, audio));
                }
                Action::ExtendUtterance { audio } => {
                    // The reply was cancelled before it said anything (and so left nothing);
                    // the utterance goes on: one user turn of both pieces.
                    let mut whole = Vec::new();
                    if let Some((id, before)) = last_user.take() {
                        conv.delete(id);
                        whole = before;
                    }
                    whole.extend_from_slice(&audio);
                    user_turns += 1;
                    let id = format!("user-{user_turns}");
                    conv.add(id.clone(), Content::UserAudio(whole.clone()));
                    respond(&conv, user_turns);
                    question_end = pending_end.take();
                    if cfg.assistant.transcribe_user {
                        conv.transcribe_when_idle(id.clone(), whole.clone());
                        transcripts += 1;
                    }
                    last_user = Some((id, whole));
                }
                Action::StopPlayback => {
                    // What was heard, read before the device is cleared.
                    heard_at_stop = reply_base.map(|base| player.played().saturating_sub(base));
                    player.clear();
                }
                Action::CancelAndTruncateReply => {
                    cancelled = current.clone();
                    let heard = heard_at_stop
                        .take()
                        .or_else(|| reply_base.map(|base| player.played().saturating_sub(base)))
                        .unwrap_or(0);
                    barge_ins += 1;
                    if heard == 0 {
                        say(format!(
                            "{} barge-in: nothing of the reply had been heard yet; it is dropped",
                            stamp(start)
                        ));
                    } else {
                        say(format!(
                            "{} barge-in: the assistant is cut after {:.2} s of its reply",
                            stamp(start),
                            heard as f64 / 24_000.0
                        ));
                    }
                    if reply_base.is_some() {
                        let notes = player.end_reply();
                        log(format!("{} reply played (cut): {notes}", stamp(start)));
                    }
                    question_end = None;
                    match (&current_item, reply_done) {
                        // Generated already and still playing: cut the item that is in the
                        // conversation to what was heard.
                        (Some(item), true) => {
                            conv.truncate(item.clone(), heard);
                            reply_done = true;
                        }
                        _ => conv.cancel(Some(heard)),
                    }
                    reply_base = None;
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    // At the end of a scripted session (--max-turns, --seconds) the last words still to be
    // transcribed are waited for, a few seconds at most, so that the log is complete; a signal
    // does not wait.
    let wait_until = Instant::now() + Duration::from_secs(10);
    while signal.is_none() && transcripts > 0 && Instant::now() < wait_until {
        select! {
            recv(stop) -> sig => signal = Some(sig.unwrap_or(0)),
            recv(conv.events()) -> ev => match ev {
                Ok(ConvEvent::Transcript { item_id, text }) => {
                    transcripts -= 1;
                    say(format!("{} user ({item_id}): {text:?}", stamp(start)));
                }
                Ok(ConvEvent::Error { message, .. }) => {
                    transcripts -= 1;
                    log(format!("{} error: {message}", stamp(start)));
                }
                Ok(_) => {}
                Err(_) => break,
            },
            default(Duration::from_millis(100)) => {}
        }
    }
    // Stop at once: nothing more is played or generated.
    conv.cancel(Some(0));
    if signal.is_some() {
        player.clear();
    }
    listener.stop();
    let stats = player.stats();
    player.close();
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
        "{} stopped after {replies} replies{}: {user_turns} user turns, {barge_ins} barge-ins, {} playback underruns{latency}",
        stamp(start),
        match signal {
            Some(sig) => format!(" ({})", signal_name(sig)),
            None => String::new(),
        },
        stats.xruns + stats.device_xruns
    ));
    Ok(())
}

fn respond(conv: &Conversation, n: u64) {
    conv.respond(Respond {
        response_id: format!("reply-{n}"),
        item_id: format!("reply-{n}"),
        output: None,
    });
}
