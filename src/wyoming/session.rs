//! One Wyoming connection as a state machine, free of I/O: client events and engine events go
//! in, [`Effect`]s come out (events to send, work for the engine).
//!
//! Requests are answered in the order they came: each becomes one or more [`Job`]s in a queue,
//! and one job at a time is given to the engine. A long text to speak is cut into sentences, one
//! job each, so that the first audio comes after the first sentence, not after the whole text.
//!
//! A conversation's tools run in the engine ([`ToolPolicy::Run`], off the engine thread): a
//! reply that calls a tool ends a round, the engine feeds the result back and the model answers
//! in the next round of the same response. [`Rounds`] says which reply ends the response; its
//! text is the answer.

use std::collections::VecDeque;

use serde_json::{json, Value};

use super::audio::{self, Collector, Format};
use super::protocol::{error_event, Event};
use dialog::conversation::{ConvEvent, ToolPolicy};
use dialog::rounds::{Ending, RoundEnd, Rounds};

/// The longest utterance transcribed, in seconds.
pub const MAX_UTTERANCE_SECONDS: usize = 120;
/// The longest text accepted for one synthesis (characters).
pub const MAX_TEXT_CHARS: usize = 20_000;
/// Jobs a connection may have waiting.
pub const MAX_QUEUED_JOBS: usize = 256;
/// A sentence longer than this is cut at a space.
const MAX_SENTENCE_CHARS: usize = 300;

/// What the server offers, fixed for its life.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The model's name (its directory).
    pub model: String,
    pub languages: Vec<String>,
    /// Voice presets: name and description.
    pub voices: Vec<(String, String)>,
    pub default_voice: String,
    /// Tool-call rounds a conversation reply may take.
    pub max_tool_rounds: usize,
}

impl Offer {
    /// Who runs the conversations' tools: the engine, up to the configured rounds per reply.
    pub fn tool_policy(&self) -> ToolPolicy {
        ToolPolicy::Run {
            max_rounds: self.max_tool_rounds,
        }
    }
}

/// Work for the engine; the I/O side runs it and feeds what happens back with
/// [`Session::handle_engine`] (or [`Session::work_failed`]), tagged with `job`.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Transcribe 16 kHz mono speech.
    Transcribe { job: u64, audio: Vec<f32> },
    /// Speak a piece of text with a voice preset.
    Speak {
        job: u64,
        text: String,
        voice: String,
    },
    /// Add a user turn to the conversation `conversation_id` and ask for a text reply (the
    /// engine runs the tools it calls, see [`Offer::tool_policy`]).
    Converse {
        job: u64,
        conversation_id: String,
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Send(Event),
    Engine(Work),
    /// A line for the server's log.
    Log(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Job {
    Transcribe {
        audio: Vec<f32>,
        language: String,
    },
    Speak {
        text: String,
        voice: String,
    },
    /// Ends the audio of a synthesis (`audio-stop`, when it started).
    AudioEnd,
    /// Ends a streamed synthesis.
    SynthesizeStopped,
    Converse {
        conversation_id: String,
        text: String,
        language: String,
    },
}

/// The job the engine is working on.
#[derive(Debug)]
enum Active {
    Transcribe {
        language: String,
        /// Pieces of the text were sent as `transcript-chunk`s while it was decoded.
        streamed: bool,
    },
    Speak,
    Converse {
        conversation_id: String,
        language: String,
        started: bool,
        /// The text of the round in progress (the last round's is the answer).
        text: String,
        rounds: Rounds,
        /// The names of the tools called, by call id (for the log of their results).
        calls: Vec<(String, String)>,
        error: Option<String>,
    },
}

/// An utterance being received.
struct Utterance {
    language: Option<String>,
    collector: Collector,
    /// A chunk could not be read: the utterance is answered with an error at `audio-stop`.
    failed: bool,
}

pub struct Session {
    offer: Offer,
    utterance: Option<Utterance>,
    /// A streamed synthesis being received: its voice and the text not yet cut into sentences.
    streaming: Option<(String, String)>,
    queue: VecDeque<Job>,
    active: Option<(u64, Active)>,
    next_job: u64,
    /// `audio-start` was sent and `audio-stop` not yet.
    audio_open: bool,
    /// Anonymous conversations (a `transcript` without a conversation id) are numbered.
    anonymous: u64,
    connection: u64,
}

fn sentences(text: &str, out: &mut Vec<String>) -> String {
    // Cuts after . ! ? followed by white space, at new lines, and long runs at a space; returns
    // the unfinished rest.
    let mut start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(i, c)) in chars.iter().enumerate() {
        let next = chars.get(k + 1).map(|&(_, c)| c);
        let end = i + c.len_utf8();
        let cut = c == '\n'
            || (matches!(c, '.' | '!' | '?' | '。' | '！' | '？')
                && next.is_some_and(char::is_whitespace));
        if cut || (end - start > MAX_SENTENCE_CHARS && c.is_whitespace()) {
            let s = text[start..end].trim();
            if !s.is_empty() {
                out.push(s.to_owned());
            }
            start = end;
        }
    }
    text[start..].to_owned()
}

impl Session {
    pub fn new(offer: Offer, connection: u64) -> Self {
        Self {
            offer,
            utterance: None,
            streaming: None,
            queue: VecDeque::new(),
            active: None,
            next_job: 0,
            audio_open: false,
            anonymous: 0,
            connection,
        }
    }

    /// Whether work is waiting or in progress.
    pub fn busy(&self) -> bool {
        self.active.is_some() || !self.queue.is_empty()
    }

    /// The `info` event.
    pub fn info(&self) -> Event {
        let attribution = json!({"name": "Liquid AI", "url": "https://huggingface.co/LiquidAI"});
        let version = env!("CARGO_PKG_VERSION");
        let model = &self.offer.model;
        let languages = &self.offer.languages;
        let voices: Vec<Value> = self
            .offer
            .voices
            .iter()
            .map(|(name, description)| {
                json!({
                    "name": name,
                    "attribution": attribution,
                    "installed": true,
                    "description": description,
                    "version": null,
                    "languages": languages,
                    "speakers": null,
                })
            })
            .collect();
        let model_entry = |what: &str| {
            json!({
                "name": model,
                "attribution": attribution,
                "installed": true,
                "description": format!("LFM2-Audio {what} ({model})"),
                "version": null,
                "languages": languages,
            })
        };
        Event::with_data(
            "info",
            json!({
                "asr": [{
                    "name": "lfm2d",
                    "attribution": attribution,
                    "installed": true,
                    "description": "lfm2d speech-to-text (LFM2-Audio on the local CPU)",
                    "version": version,
                    "models": [model_entry("speech-to-text")],
                    "supports_transcript_streaming": true,
                }],
                "tts": [{
                    "name": "lfm2d",
                    "attribution": attribution,
                    "installed": true,
                    "description": "lfm2d text-to-speech (LFM2-Audio on the local CPU)",
                    "version": version,
                    "voices": voices,
                    "supports_synthesize_streaming": true,
                }],
                "handle": [{
                    "name": "lfm2d",
                    "attribution": attribution,
                    "installed": true,
                    "description": "lfm2d conversation agent (LFM2-Audio on the local CPU)",
                    "version": version,
                    "models": [model_entry("conversation")],
                    "supports_handled_streaming": true,
                    "supports_home_control": false,
                }],
                "intent": [],
                "wake": [],
                "mic": [],
                "snd": [],
            }),
        )
    }

    fn error(code: &str, text: impl Into<String>) -> Effect {
        Effect::Send(error_event(code, text))
    }

    fn send(kind: &str, data: Value) -> Effect {
        Effect::Send(Event::with_data(kind, data))
    }

    fn enqueue(&mut self, job: Job, out: &mut Vec<Effect>) -> bool {
        if self.queue.len() >= MAX_QUEUED_JOBS {
            out.push(Self::error(
                "too_busy",
                format!(
                    "{MAX_QUEUED_JOBS} requests are already waiting on this connection; this one is dropped"
                ),
            ));
            return false;
        }
        self.queue.push_back(job);
        true
    }

    fn voice_of(&self, data: &serde_json::Map<String, Value>) -> Result<String, String> {
        let name = data
            .get("voice")
            .and_then(|v| v.get("name"))
            .and_then(Value::as_str);
        match name {
            None => Ok(self.offer.default_voice.clone()),
            Some(n) if self.offer.voices.iter().any(|(v, _)| v == n) => Ok(n.to_owned()),
            Some(n) => {
                let known: Vec<&str> = self.offer.voices.iter().map(|(v, _)| v.as_str()).collect();
                Err(format!(
                    "unknown voice {n:?}; known voices: {}",
                    known.join(", ")
                ))
            }
        }
    }

    fn queue_sentences(&mut self, parts: Vec<String>, voice: &str, out: &mut Vec<Effect>) {
        for text in parts {
            if !self.enqueue(
                Job::Speak {
                    text,
                    voice: voice.to_owned(),
                },
                out,
            ) {
                break;
            }
        }
    }

    /// A client event.
    pub fn handle_client(&mut self, ev: Event) -> Vec<Effect> {
        let mut out = Vec::new();
        let data = &ev.data;
        match ev.kind.as_str() {
            "describe" => out.push(Effect::Send(self.info())),
            "ping" => out.push(Self::send(
                "pong",
                json!({"text": data.get("text").cloned().unwrap_or(Value::Null)}),
            )),
            // One program of each kind: any choice is ours.
            "select-program" => {}
            "transcribe" => {
                self.utterance = Some(Utterance {
                    language: data
                        .get("language")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    collector: Collector::new(MAX_UTTERANCE_SECONDS),
                    failed: false,
                });
            }
            "audio-start" => {
                let u = self.utterance.get_or_insert_with(|| Utterance {
                    language: None,
                    collector: Collector::new(MAX_UTTERANCE_SECONDS),
                    failed: false,
                });
                if let Err(e) = Format::from_data(data) {
                    u.failed = true;
                    out.push(Self::error("unsupported_audio", format!("audio-start: {e}")));
                }
            }
            "audio-chunk" => {
                let Some(u) = self.utterance.as_mut() else {
                    out.push(Self::error(
                        "unexpected_event",
                        "audio-chunk before audio-start (or transcribe): the chunk is dropped",
                    ));
                    return out;
                };
                if u.failed {
                    return out;
                }
                let pushed =
                    Format::from_data(data).and_then(|f| u.collector.push(&ev.payload, f));
                if let Err(e) = pushed {
                    u.failed = true;
                    out.push(Self::error("unsupported_audio", format!("audio-chunk: {e}")));
                }
            }
            "audio-stop" => {
                let Some(u) = self.utterance.take() else {
                    out.push(Self::error(
                        "unexpected_event",
                        "audio-stop without audio-start: nothing to transcribe",
                    ));
                    return out;
                };
                let language = u
                    .language
                    .clone()
                    .or_else(|| self.offer.languages.first().cloned())
                    .unwrap_or_else(|| "en".into());
                if u.failed {
                    // The error was sent with the chunk that could not be read.
                    out.push(Self::send(
                        "transcript",
                        json!({"text": "", "language": language}),
                    ));
                    return out;
                }
                let audio = u.collector.finish();
                self.enqueue(Job::Transcribe { audio, language }, &mut out);
            }
            "synthesize" => {
                if self.streaming.is_some() {
                    // Streaming clients also send the whole text for older servers: ignored.
                    return out;
                }
                let Some(text) = data.get("text").and_then(Value::as_str) else {
                    out.push(Self::error("invalid_event", "synthesize: \"text\" is missing"));
                    return out;
                };
                if text.chars().count() > MAX_TEXT_CHARS {
                    out.push(Self::error(
                        "text_too_long",
                        format!("synthesize: the text is over {MAX_TEXT_CHARS} characters"),
                    ));
                    return out;
                }
                let voice = match self.voice_of(data) {
                    Ok(v) => v,
                    Err(e) => {
                        out.push(Self::error("unknown_voice", format!("synthesize: {e}")));
                        return out;
                    }
                };
                let mut parts = Vec::new();
                let rest = sentences(text, &mut parts);
                if !rest.trim().is_empty() {
                    parts.push(rest.trim().to_owned());
                }
                if parts.is_empty() {
                    out.push(Self::error("invalid_event", "synthesize: the text is empty"));
                    // The audio stream is still opened and closed, as a client waits for it.
                    out.push(Self::send(
                        "audio-start",
                        json!({"rate": 24000, "width": 2, "channels": 1}),
                    ));
                    out.push(Self::send("audio-stop", json!({})));
                    return out;
                }
                self.queue_sentences(parts, &voice, &mut out);
                self.enqueue(Job::AudioEnd, &mut out);
            }
            "synthesize-start" => {
                let voice = match self.voice_of(data) {
                    Ok(v) => v,
                    Err(e) => {
                        out.push(Self::error(
                            "unknown_voice",
                            format!("synthesize-start: {e}; using {}", self.offer.default_voice),
                        ));
                        self.offer.default_voice.clone()
                    }
                };
                self.streaming = Some((voice, String::new()));
            }
            "synthesize-chunk" => {
                let Some((voice, buf)) = self.streaming.as_mut() else {
                    out.push(Self::error(
                        "unexpected_event",
                        "synthesize-chunk without synthesize-start: dropped",
                    ));
                    return out;
                };
                let text = data.get("text").and_then(Value::as_str).unwrap_or_default();
                if buf.chars().count() + text.chars().count() > MAX_TEXT_CHARS {
                    out.push(Self::error(
                        "text_too_long",
                        format!(
                            "synthesize-chunk: more than {MAX_TEXT_CHARS} characters without the end of a sentence; dropped"
                        ),
                    ));
                    return out;
                }
                buf.push_str(text);
                let mut parts = Vec::new();
                *buf = sentences(buf, &mut parts);
                let voice = voice.clone();
                self.queue_sentences(parts, &voice, &mut out);
            }
            "synthesize-stop" => {
                let Some((voice, rest)) = self.streaming.take() else {
                    out.push(Self::error(
                        "unexpected_event",
                        "synthesize-stop without synthesize-start",
                    ));
                    return out;
                };
                if !rest.trim().is_empty() {
                    self.queue_sentences(vec![rest.trim().to_owned()], &voice, &mut out);
                }
                self.enqueue(Job::AudioEnd, &mut out);
                self.enqueue(Job::SynthesizeStopped, &mut out);
            }
            "transcript" => {
                let Some(text) = data.get("text").and_then(Value::as_str) else {
                    out.push(Self::error("invalid_event", "transcript: \"text\" is missing"));
                    return out;
                };
                if text.chars().count() > MAX_TEXT_CHARS {
                    out.push(Self::error(
                        "text_too_long",
                        format!("transcript: the text is over {MAX_TEXT_CHARS} characters"),
                    ));
                    return out;
                }
                let conversation_id = data
                    .get("context")
                    .and_then(|c| c.get("conversation_id"))
                    .and_then(Value::as_str)
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .unwrap_or_else(|| {
                        self.anonymous += 1;
                        format!("lfm2d-{}-{}", self.connection, self.anonymous)
                    });
                let language = data
                    .get("language")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| self.offer.languages.first().cloned())
                    .unwrap_or_else(|| "en".into());
                self.enqueue(
                    Job::Converse {
                        conversation_id,
                        text: text.to_owned(),
                        language,
                    },
                    &mut out,
                );
            }
            other => out.push(Self::error(
                "unknown_event",
                format!(
                    "unknown event type {other:?}: lfm2d serves asr (transcribe, audio-*), tts (synthesize*) and handle (transcript)"
                ),
            )),
        }
        self.next(&mut out);
        out
    }

    /// Starts queued jobs until one waits on the engine.
    fn next(&mut self, out: &mut Vec<Effect>) {
        while self.active.is_none() {
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            self.next_job += 1;
            let id = self.next_job;
            match job {
                Job::AudioEnd => {
                    if std::mem::take(&mut self.audio_open) {
                        out.push(Self::send("audio-stop", json!({})));
                    }
                }
                Job::SynthesizeStopped => out.push(Self::send("synthesize-stopped", json!({}))),
                Job::Transcribe { audio, language } => {
                    out.push(Self::send(
                        "transcript-start",
                        json!({"language": language}),
                    ));
                    self.active = Some((
                        id,
                        Active::Transcribe {
                            language,
                            streamed: false,
                        },
                    ));
                    out.push(Effect::Engine(Work::Transcribe { job: id, audio }));
                }
                Job::Speak { text, voice } => {
                    self.open_audio(out);
                    self.active = Some((id, Active::Speak));
                    out.push(Effect::Engine(Work::Speak {
                        job: id,
                        text,
                        voice,
                    }));
                }
                Job::Converse {
                    conversation_id,
                    text,
                    language,
                } => {
                    self.active = Some((
                        id,
                        Active::Converse {
                            conversation_id: conversation_id.clone(),
                            language,
                            started: false,
                            text: String::new(),
                            rounds: Rounds::new(self.offer.tool_policy()),
                            calls: Vec::new(),
                            error: None,
                        },
                    ));
                    out.push(Effect::Engine(Work::Converse {
                        job: id,
                        conversation_id,
                        text,
                    }));
                }
            }
        }
    }

    fn open_audio(&mut self, out: &mut Vec<Effect>) {
        if !self.audio_open {
            self.audio_open = true;
            out.push(Self::send(
                "audio-start",
                json!({"rate": 24000, "width": 2, "channels": 1}),
            ));
        }
    }

    /// Something happened in the engine for `job`.
    pub fn handle_engine(&mut self, job: u64, ev: ConvEvent) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some((id, active)) = self.active.as_mut() else {
            return out;
        };
        if *id != job {
            return out;
        }
        let mut done = false;
        match active {
            Active::Transcribe { language, streamed } => match ev {
                ConvEvent::TranscriptDelta { text, .. } => {
                    *streamed = true;
                    out.push(Self::send("transcript-chunk", json!({"text": text})));
                }
                ConvEvent::Transcript { text, .. } => {
                    if !*streamed && !text.is_empty() {
                        out.push(Self::send("transcript-chunk", json!({"text": text})));
                    }
                    out.push(Self::send("transcript-stop", json!({})));
                    out.push(Self::send(
                        "transcript",
                        json!({"text": text, "language": language}),
                    ));
                    done = true;
                }
                ConvEvent::Error { message, .. } => {
                    out.push(Self::error(
                        "transcription_failed",
                        format!("transcription failed: {message}"),
                    ));
                    out.push(Self::send("transcript-stop", json!({})));
                    out.push(Self::send(
                        "transcript",
                        json!({"text": "", "language": language}),
                    ));
                    done = true;
                }
                _ => {}
            },
            Active::Speak => match ev {
                ConvEvent::Audio { samples, .. } if !samples.is_empty() => {
                    out.push(Effect::Send(
                        Event::with_data(
                            "audio-chunk",
                            json!({"rate": 24000, "width": 2, "channels": 1}),
                        )
                        .with_payload(audio::encode_pcm16(&samples)),
                    ));
                }
                ConvEvent::Error { message, .. } => {
                    out.push(Self::error(
                        "synthesis_failed",
                        format!("synthesis failed: {message}"),
                    ));
                }
                ConvEvent::ReplyDone { .. } => done = true,
                _ => {}
            },
            Active::Converse {
                conversation_id,
                language,
                started,
                text,
                rounds,
                calls,
                error,
            } => match rounds.event(&ev) {
                Some(RoundEnd::ToolsRun { round }) => {
                    out.push(Effect::Log(format!(
                        "conversation {conversation_id:?}: tool round {round}"
                    )));
                    // The answer comes in the next round.
                    text.clear();
                }
                Some(RoundEnd::Over(ending)) => {
                    let answer = text.trim().to_owned();
                    let context = json!({"conversation_id": conversation_id});
                    if *started {
                        out.push(Self::send("handled-stop", json!({})));
                    }
                    if answer.is_empty() {
                        let reason = match (error.take(), ending) {
                            (Some(e), _) => format!("the model could not answer: {e}"),
                            (None, Ending::OutOfRounds { max_rounds }) => {
                                format!("the model kept calling tools after {max_rounds} rounds")
                            }
                            (None, Ending::Cancelled) => "the answer was cancelled".to_owned(),
                            (None, Ending::Answered) => "the model gave an empty answer".to_owned(),
                        };
                        out.push(Self::send(
                            "not-handled",
                            json!({"text": reason, "context": context}),
                        ));
                    } else {
                        out.push(Self::send(
                            "handled",
                            json!({"text": answer, "context": context, "language": language}),
                        ));
                    }
                    done = true;
                }
                None => match ev {
                    ConvEvent::Text { piece, .. } => {
                        if !*started {
                            *started = true;
                            out.push(Self::send(
                                "handled-start",
                                json!({"context": {"conversation_id": conversation_id}}),
                            ));
                        }
                        text.push_str(&piece);
                        out.push(Self::send("handled-chunk", json!({"text": piece})));
                    }
                    ConvEvent::ToolCall { call_id, name, .. } => calls.push((call_id, name)),
                    ConvEvent::ToolResult {
                        call_id,
                        output,
                        ok,
                        ..
                    } => {
                        let name = calls
                            .iter()
                            .find(|(id, _)| *id == call_id)
                            .map_or("?", |(_, n)| n.as_str());
                        out.push(Effect::Log(if ok {
                            format!("tool {name}: ok")
                        } else {
                            format!("tool {name}: failed: {output}")
                        }));
                    }
                    ConvEvent::Error { message, .. } => *error = Some(message),
                    _ => {}
                },
            },
        }
        if done {
            self.active = None;
            self.next(&mut out);
        }
        out
    }

    /// The work of `job` could not be done (the engine stopped, a conversation could not be
    /// opened): the request is answered with an error and the next one starts.
    pub fn work_failed(&mut self, job: u64, message: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some((id, active)) = self.active.take() else {
            return out;
        };
        if id != job {
            self.active = Some((id, active));
            return out;
        }
        match active {
            Active::Transcribe { language, .. } => {
                out.push(Self::error("engine_failed", message));
                out.push(Self::send("transcript-stop", json!({})));
                out.push(Self::send(
                    "transcript",
                    json!({"text": "", "language": language}),
                ));
            }
            Active::Speak => out.push(Self::error("engine_failed", message)),
            Active::Converse {
                conversation_id,
                started,
                ..
            } => {
                if started {
                    out.push(Self::send("handled-stop", json!({})));
                }
                out.push(Self::send(
                    "not-handled",
                    json!({"text": format!("the model could not answer: {message}"), "context": {"conversation_id": conversation_id}}),
                ));
            }
        }
        self.next(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            model: "tiny".into(),
            languages: vec!["en".into()],
            voices: vec![
                ("us-female".into(), "US female voice".into()),
                ("uk-male".into(), "UK male voice".into()),
            ],
            default_voice: "us-female".into(),
            max_tool_rounds: 2,
        }
    }

    fn ev(kind: &str, data: Value) -> Event {
        Event::with_data(kind, data)
    }

    fn sent(out: &[Effect]) -> Vec<String> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Send(ev) => Some(ev.kind.clone()),
                _ => None,
            })
            .collect()
    }

    fn work(out: &[Effect]) -> Vec<Work> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Engine(w) => Some(w.clone()),
                _ => None,
            })
            .collect()
    }

    fn event<'a>(out: &'a [Effect], kind: &str) -> &'a Event {
        out.iter()
            .find_map(|e| match e {
                Effect::Send(ev) if ev.kind == kind => Some(ev),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no {kind} in {out:?}"))
    }

    #[test]
    fn describe_lists_the_three_programs_and_the_voices() {
        let mut s = Session::new(offer(), 1);
        let out = s.handle_client(Event::new("describe"));
        let info = event(&out, "info");
        assert_eq!(info.data["asr"][0]["supports_transcript_streaming"], true);
        assert_eq!(info.data["asr"][0]["models"][0]["languages"][0], "en");
        assert_eq!(info.data["tts"][0]["voices"][1]["name"], "uk-male");
        assert_eq!(info.data["tts"][0]["supports_synthesize_streaming"], true);
        assert_eq!(info.data["handle"][0]["supports_handled_streaming"], true);
    }

    #[test]
    fn audio_in_any_format_becomes_one_transcription() {
        let mut s = Session::new(offer(), 1);
        s.handle_client(ev("transcribe", json!({"language": "en"})));
        s.handle_client(ev(
            "audio-start",
            json!({"rate": 48000, "width": 2, "channels": 2}),
        ));
        let chunk = ev(
            "audio-chunk",
            json!({"rate": 48000, "width": 2, "channels": 2}),
        )
        .with_payload(vec![0; 48000 * 4 / 10]);
        assert!(s.handle_client(chunk).is_empty());
        let out = s.handle_client(Event::new("audio-stop"));
        assert_eq!(sent(&out), ["transcript-start"]);
        let Work::Transcribe { job, audio } = &work(&out)[0] else {
            panic!("{out:?}")
        };
        assert!((audio.len() as i64 - 1600).abs() <= 2, "{}", audio.len());
        let out = s.handle_engine(
            *job,
            ConvEvent::Transcript {
                item_id: "x".into(),
                text: "What time is it?".into(),
            },
        );
        assert_eq!(
            sent(&out),
            ["transcript-chunk", "transcript-stop", "transcript"]
        );
        assert_eq!(event(&out, "transcript").data["text"], "What time is it?");
        assert!(!s.busy());
    }

    #[test]
    fn a_transcript_streams_in_chunks_as_it_is_decoded() {
        let mut s = Session::new(offer(), 1);
        s.handle_client(ev("transcribe", json!({})));
        s.handle_client(ev(
            "audio-start",
            json!({"rate": 16000, "width": 2, "channels": 1}),
        ));
        let chunk = ev(
            "audio-chunk",
            json!({"rate": 16000, "width": 2, "channels": 1}),
        )
        .with_payload(vec![0; 6400]);
        s.handle_client(chunk);
        let out = s.handle_client(Event::new("audio-stop"));
        let Work::Transcribe { job, .. } = &work(&out)[0] else {
            panic!("{out:?}")
        };
        let mut chunks = Vec::new();
        for piece in ["What", " time", " is it?"] {
            let out = s.handle_engine(
                *job,
                ConvEvent::TranscriptDelta {
                    item_id: "x".into(),
                    text: piece.into(),
                },
            );
            assert_eq!(sent(&out), ["transcript-chunk"]);
            chunks.push(event(&out, "transcript-chunk").data["text"].clone());
            assert!(s.busy());
        }
        assert_eq!(chunks, ["What", " time", " is it?"]);
        let out = s.handle_engine(
            *job,
            ConvEvent::Transcript {
                item_id: "x".into(),
                text: "What time is it?".into(),
            },
        );
        // The text was streamed already: no chunk repeats it.
        assert_eq!(sent(&out), ["transcript-stop", "transcript"]);
        assert_eq!(event(&out, "transcript").data["text"], "What time is it?");
        assert!(!s.busy());
    }

    #[test]
    fn unreadable_audio_is_an_error_and_an_empty_transcript() {
        let mut s = Session::new(offer(), 1);
        let out = s.handle_client(ev(
            "audio-start",
            json!({"rate": 16000, "width": 7, "channels": 1}),
        ));
        assert_eq!(sent(&out), ["error"]);
        assert_eq!(event(&out, "error").data["code"], "unsupported_audio");
        let out = s.handle_client(Event::new("audio-stop"));
        assert_eq!(sent(&out), ["transcript"]);
        assert!(work(&out).is_empty());
        // An odd number of bytes in a 16-bit chunk.
        s.handle_client(ev(
            "audio-start",
            json!({"rate": 16000, "width": 2, "channels": 1}),
        ));
        let out = s.handle_client(
            ev(
                "audio-chunk",
                json!({"rate": 16000, "width": 2, "channels": 1}),
            )
            .with_payload(vec![0; 3]),
        );
        assert!(event(&out, "error").data["text"]
            .as_str()
            .unwrap()
            .contains("3 bytes"));
        let out = s.handle_client(Event::new("audio-chunk"));
        assert!(sent(&out).is_empty(), "after a failure chunks are dropped");
    }

    #[test]
    fn synthesis_is_cut_into_sentences_and_streamed() {
        let mut s = Session::new(offer(), 1);
        let out = s.handle_client(ev(
            "synthesize",
            json!({"text": "Hello there. How are you?", "voice": {"name": "uk-male"}}),
        ));
        assert_eq!(sent(&out), ["audio-start"]);
        let Work::Speak { job, text, voice } = &work(&out)[0] else {
            panic!()
        };
        assert_eq!((text.as_str(), voice.as_str()), ("Hello there.", "uk-male"));
        let out = s.handle_engine(
            *job,
            ConvEvent::Audio {
                response_id: "r".into(),
                samples: vec![0.5; 1920],
            },
        );
        let chunk = event(&out, "audio-chunk");
        assert_eq!(chunk.payload.len(), 3840);
        assert_eq!(chunk.data["rate"], 24000);
        let done = ConvEvent::ReplyDone {
            response_id: "r".into(),
            item_id: "i".into(),
            text: String::new(),
            audio_samples: 1920,
            cancelled: false,
        };
        let out = s.handle_engine(*job, done.clone());
        let Work::Speak { job, text, .. } = &work(&out)[0] else {
            panic!()
        };
        assert_eq!(text, "How are you?");
        assert!(sent(&out).is_empty());
        let out = s.handle_engine(*job, done);
        assert_eq!(sent(&out), ["audio-stop"]);
        assert!(!s.busy());
        let out = s.handle_client(ev(
            "synthesize",
            json!({"text": "x", "voice": {"name": "robot"}}),
        ));
        assert!(event(&out, "error").data["text"]
            .as_str()
            .unwrap()
            .contains("us-female, uk-male"));
    }

    #[test]
    fn streamed_synthesis_ends_with_synthesize_stopped() {
        let mut s = Session::new(offer(), 1);
        s.handle_client(ev("synthesize-start", json!({})));
        let out = s.handle_client(ev("synthesize-chunk", json!({"text": "One two"})));
        assert!(out.is_empty());
        let out = s.handle_client(ev("synthesize-chunk", json!({"text": " three. Four"})));
        assert_eq!(sent(&out), ["audio-start"]);
        let Work::Speak { job, text, .. } = &work(&out)[0] else {
            panic!()
        };
        assert_eq!(text, "One two three.");
        // The whole text, sent for older servers, is ignored.
        assert!(s
            .handle_client(ev("synthesize", json!({"text": "One two three. Four"})))
            .is_empty());
        assert!(s.handle_client(Event::new("synthesize-stop")).is_empty());
        let done = ConvEvent::ReplyDone {
            response_id: "r".into(),
            item_id: "i".into(),
            text: String::new(),
            audio_samples: 0,
            cancelled: false,
        };
        let out = s.handle_engine(*job, done.clone());
        let Work::Speak { job, text, .. } = &work(&out)[0] else {
            panic!()
        };
        assert_eq!(text, "Four");
        let out = s.handle_engine(*job, done);
        assert_eq!(sent(&out), ["audio-stop", "synthesize-stopped"]);
    }

    fn logged(out: &[Effect]) -> Vec<String> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Log(line) => Some(line.clone()),
                _ => None,
            })
            .collect()
    }

    fn call(id: &str) -> ConvEvent {
        ConvEvent::ToolCall {
            response_id: "r".into(),
            call_id: id.into(),
            name: "get_current_time".into(),
            arguments: "{}".into(),
        }
    }

    fn done(item_id: &str) -> ConvEvent {
        ConvEvent::ReplyDone {
            response_id: "r".into(),
            item_id: item_id.into(),
            text: String::new(),
            audio_samples: 0,
            cancelled: false,
        }
    }

    fn text(piece: &str) -> ConvEvent {
        ConvEvent::Text {
            response_id: "r".into(),
            piece: piece.into(),
        }
    }

    /// Asks a question in conversation `id` (None: an anonymous one); returns the job.
    fn ask(s: &mut Session, id: Option<&str>) -> (u64, String) {
        let data = match id {
            Some(id) => json!({"text": "What time is it?", "context": {"conversation_id": id}}),
            None => json!({"text": "What time is it?"}),
        };
        let out = s.handle_client(ev("transcript", data));
        let Work::Converse {
            job,
            conversation_id,
            text,
        } = &work(&out)[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!(text, "What time is it?");
        (*job, conversation_id.clone())
    }

    #[test]
    fn a_conversation_streams_the_answer_after_the_engine_ran_its_tool() {
        let mut s = Session::new(offer(), 7);
        let (job, conversation_id) = ask(&mut s, Some("c1"));
        assert_eq!(conversation_id, "c1");
        assert_eq!(s.offer.tool_policy(), ToolPolicy::Run { max_rounds: 2 });
        // The first round: a word before the call, then the call; the engine runs the tool.
        let out = s.handle_engine(job, text("Let me look."));
        assert_eq!(sent(&out), ["handled-start", "handled-chunk"]);
        assert!(s.handle_engine(job, call("call_1")).is_empty());
        let out = s.handle_engine(job, done("i"));
        assert!(sent(&out).is_empty() && work(&out).is_empty(), "{out:?}");
        assert!(s.busy(), "the answer is still to come");
        let out = s.handle_engine(
            job,
            ConvEvent::ToolResult {
                response_id: "r".into(),
                call_id: "call_1".into(),
                output: "{\"time\": \"12:00\"}".into(),
                ok: true,
            },
        );
        assert_eq!(logged(&out), ["tool get_current_time: ok"]);
        // The answer round.
        let out = s.handle_engine(job, text("It is noon."));
        assert_eq!(sent(&out), ["handled-chunk"]);
        let out = s.handle_engine(job, done("i-1"));
        assert_eq!(sent(&out), ["handled-stop", "handled"]);
        let handled = event(&out, "handled");
        assert_eq!(handled.data["text"], "It is noon.", "the last round's text");
        assert_eq!(handled.data["context"]["conversation_id"], "c1");
        assert!(!s.busy());
    }

    #[test]
    fn a_conversation_not_answered_says_why() {
        let mut s = Session::new(offer(), 7);
        // The model kept calling tools: after the second round the engine runs no more.
        let (job, _) = ask(&mut s, Some("c1"));
        for (round, item) in ["i", "i-1"].iter().enumerate() {
            s.handle_engine(job, call(&format!("call_{round}")));
            let out = s.handle_engine(job, done(item));
            assert!(sent(&out).is_empty(), "{out:?}");
            assert_eq!(
                logged(&out),
                [format!("conversation \"c1\": tool round {}", round + 1)]
            );
            s.handle_engine(
                job,
                ConvEvent::ToolResult {
                    response_id: "r".into(),
                    call_id: format!("call_{round}"),
                    output: "{\"error\": \"no\"}".into(),
                    ok: false,
                },
            );
        }
        s.handle_engine(job, call("call_2"));
        let out = s.handle_engine(job, done("i-2"));
        assert_eq!(sent(&out), ["not-handled"]);
        assert_eq!(
            event(&out, "not-handled").data["text"],
            "the model kept calling tools after 2 rounds"
        );
        assert!(!s.busy());
        // The engine's note that it ran no more tools comes after the end: nothing to send.
        let late = ConvEvent::Error {
            item_id: Some("i-2".into()),
            message: "the model called tools again after 2 rounds; not run".into(),
        };
        assert!(s.handle_engine(job, late).is_empty());
        // A model error.
        let (job, conversation_id) = ask(&mut s, None);
        assert_eq!(conversation_id, "lfm2d-7-1");
        s.handle_engine(
            job,
            ConvEvent::Error {
                item_id: None,
                message: "the context is full".into(),
            },
        );
        let out = s.handle_engine(job, done("i"));
        assert_eq!(sent(&out), ["not-handled"]);
        assert_eq!(
            event(&out, "not-handled").data["text"],
            "the model could not answer: the context is full"
        );
        // Nothing said.
        let (job, _) = ask(&mut s, None);
        let out = s.handle_engine(job, done("i"));
        assert_eq!(
            event(&out, "not-handled").data["text"],
            "the model gave an empty answer"
        );
    }

    #[test]
    fn requests_wait_their_turn_and_unknown_events_are_errors() {
        let mut s = Session::new(offer(), 1);
        let out = s.handle_client(ev("synthesize", json!({"text": "Hi."})));
        let Work::Speak { job, .. } = &work(&out)[0] else {
            panic!()
        };
        let job = *job;
        let out = s.handle_client(ev("transcript", json!({"text": "Hello"})));
        assert!(work(&out).is_empty(), "queued behind the synthesis");
        let out = s.handle_client(ev("dance", json!({})));
        assert_eq!(event(&out, "error").data["code"], "unknown_event");
        let out = s.work_failed(job, "the engine has stopped");
        assert_eq!(sent(&out), ["error", "audio-stop"]);
        assert!(matches!(work(&out)[0], Work::Converse { .. }));
        assert_eq!(
            sent(&s.handle_client(ev("ping", json!({"text": "x"})))),
            ["pong"]
        );
    }

    #[test]
    fn sentences_are_cut_where_they_end() {
        let mut out = Vec::new();
        let rest = sentences("Hi. 3.5 is a number! Really?\nYes and", &mut out);
        assert_eq!(out, ["Hi.", "3.5 is a number!", "Really?"]);
        assert_eq!(rest, "Yes and");
        let mut out = Vec::new();
        let rest = sentences("Yes and no", &mut out);
        assert!(out.is_empty());
        assert_eq!(rest, "Yes and no");
        let long = "word ".repeat(200);
        let mut out = Vec::new();
        let rest = sentences(&long, &mut out);
        assert!(out.iter().all(|s| s.len() <= MAX_SENTENCE_CHARS + 5));
        assert!(rest.len() <= MAX_SENTENCE_CHARS + 5);
    }
}
