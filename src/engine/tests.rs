//! The engine on the tiny-c fixture (random weights, with a detokenizer). Histories that change
//! in the middle (barge-in, truncation, deletion, trimming) are checked against a fresh session
//! that prefills the same history from scratch, built here without the engine's own code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use lfm2_audio::generate::{prefill_chat, GenerationParams, Token};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::{ChatState, Item};
use lfm2_audio::sampling::SamplingParams;
use lfm2_audio::session::Session;

use super::background::Background;
use super::worker::{strip_specials, Body, Conv, Worker};
use super::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-c/model")
}

fn model() -> Arc<Lfm2AudioModel> {
    Arc::new(Lfm2AudioModel::load(&fixture()).unwrap())
}

fn worker(model: &Arc<Lfm2AudioModel>, options: EngineOptions) -> Worker {
    let detok = codec::open_detokenizer(&fixture(), codec::DetokenizerChoice::Auto).unwrap();
    Worker::new(Arc::clone(model), detok, options)
}

fn clip() -> Vec<f32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio/what_time_16k.wav");
    audio_io::decode::read_mono(&path).unwrap().0
}

fn setup(max_new_tokens: usize) -> Setup {
    Setup {
        instructions: "Respond with interleaved text and audio.".into(),
        tools: Vec::new(),
        tool_policy: ToolPolicy::Report,
        params: GenerationParams {
            max_new_tokens,
            text: SamplingParams::GREEDY,
            audio: SamplingParams::GREEDY,
            seed: 0,
        },
        output: Output::Speech,
    }
}

fn open(w: &Worker, setup: Setup) -> (Conv, Receiver<ConvEvent>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (w.open(setup, tx, Arc::new(Cancel::default())).unwrap(), rx)
}

fn respond(w: &mut Worker, conv: &mut Conv, id: &str) {
    let seq = conv.cancel.ask();
    w.respond(
        conv,
        seq,
        Respond {
            response_id: id.into(),
            item_id: id.into(),
            output: None,
        },
    )
    .unwrap();
}

fn drain(rx: &Receiver<ConvEvent>) -> Vec<ConvEvent> {
    rx.try_iter().collect()
}

/// A fresh session prefilled with the system turn and then the conversation's entries, each
/// built from what it holds: turns through `ChatState`, replies token by token.
fn fresh(model: &Lfm2AudioModel, conv: &Conv, user_audio: &[(&str, Vec<f32>)]) -> Session {
    let tok = &model.tokenizer;
    let mut chat = ChatState::new(tok).unwrap();
    let system = dialog::tools::system_prompt(&conv.setup.instructions, &conv.setup.tools);
    chat.new_turn(tok, "system").unwrap();
    chat.add_text(tok, &system).unwrap();
    chat.end_turn(tok).unwrap();
    let mut s = Session::new(model.backbone.clone()).unwrap();
    prefill_chat(&mut s, &chat).unwrap();
    for e in &conv.entries {
        match &e.body {
            Body::Turn(_) => {
                let mut turn = ChatState::empty();
                if let Some((_, audio)) = user_audio.iter().find(|(id, _)| *id == e.id) {
                    turn.new_turn(tok, "user").unwrap();
                    turn.add_audio(model.audio.embed(audio).unwrap()).unwrap();
                    turn.end_turn(tok).unwrap();
                    let emb = turn.embeddings(&model.backbone, 0).unwrap();
                    s.prefill(&emb, turn.items()).unwrap();
                } else {
                    // Text turns: their tokens as the engine recorded them.
                    let ids: Vec<u32> = conv.session.items()[e.start..e.start + e.len]
                        .iter()
                        .map(|i| match i {
                            Item::Text(id) => *id,
                            _ => panic!("a text turn holds audio"),
                        })
                        .collect();
                    s.prefill_text(&ids).unwrap();
                }
            }
            Body::Reply { tokens, .. } => {
                s.prefill_text(&tok.encode("<|im_start|>assistant\n").unwrap())
                    .unwrap();
                for t in tokens {
                    match t {
                        Token::Text(id) => drop(s.step_text(*id).unwrap()),
                        Token::Audio(f) => drop(
                            s.step(
                                &model.audio_head.frame_embedding(f).unwrap(),
                                Item::AudioOut,
                            )
                            .unwrap(),
                        ),
                    }
                }
                s.prefill_text(&tok.encode("<|im_end|>\n").unwrap())
                    .unwrap();
            }
        }
    }
    s
}

fn assert_same_state(got: &Session, want: &Session) {
    assert_eq!(got.len(), want.len(), "positions");
    assert_eq!(got.items(), want.items(), "position kinds and tokens");
    let got = got.state().caches().unwrap();
    let want = want.state().caches().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let diff = max(&(g - w).unwrap());
        let scale = max(w);
        assert!(
            diff <= 1e-5 * scale.max(1e-6),
            "cache differs: {diff} (scale {scale})"
        );
    }
}

use candle_core::Tensor;

/// A barge-in truncates the assistant's turn to the frames that were played (and the text
/// before them), and the conversation is then exactly a fresh prefill of that history.
#[test]
fn barge_in_leaves_the_state_of_a_fresh_prefill_of_what_was_heard() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    let (mut conv, rx) = open(&w, setup(60));
    let wave = clip();
    w.add(&mut conv, "user-1".into(), Content::UserAudio(wave.clone()))
        .unwrap();
    // The listener interrupts after the third piece of audio, having heard 2.5 frames.
    let cancel = Arc::clone(&conv.cancel);
    let watcher = std::thread::spawn(move || {
        let mut audio = 0;
        for ev in rx.iter() {
            if let ConvEvent::Audio { .. } = ev {
                audio += 1;
                if audio == 3 {
                    cancel.cancel(Some(4800));
                }
            }
            if let ConvEvent::ReplyDone {
                audio_samples,
                cancelled,
                ..
            } = ev
            {
                return (audio_samples, cancelled, rx);
            }
        }
        panic!("no ReplyDone");
    });
    respond(&mut w, &mut conv, "reply-1");
    let (samples, cancelled, rx) = watcher.join().unwrap();
    assert!(cancelled, "the reply was interrupted");
    assert_eq!(samples, 3 * 1920, "ceil(4800 / 1920) frames were heard");
    let Body::Reply { tokens, .. } = &conv.entries.last().unwrap().body else {
        panic!("the reply is the last entry");
    };
    assert_eq!(
        tokens
            .iter()
            .filter(|t| matches!(t, Token::Audio(_)))
            .count(),
        3
    );
    assert_same_state(
        &conv.session,
        &fresh(&model, &conv, &[("user-1", wave.clone())]),
    );

    // And the conversation goes on from there.
    let before = conv.session.len();
    w.add(&mut conv, "user-2".into(), Content::UserAudio(wave.clone()))
        .unwrap();
    respond(&mut w, &mut conv, "reply-2");
    assert!(conv.session.len() > before);
    assert!(drain(&rx).iter().any(|e| matches!(
        e,
        ConvEvent::ReplyDone {
            cancelled: false,
            ..
        }
    )));
}

/// Truncating an earlier reply and deleting a turn in the middle re-prefill what follows; the
/// result equals a fresh prefill of the changed history.
#[test]
fn truncate_and_delete_in_the_middle_equal_a_fresh_prefill() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    let (mut conv, rx) = open(&w, setup(40));
    w.add(
        &mut conv,
        "u1".into(),
        Content::UserText("Hello there.".into()),
    )
    .unwrap();
    respond(&mut w, &mut conv, "r1");
    w.add(
        &mut conv,
        "u2".into(),
        Content::UserText("Tell me more.".into()),
    )
    .unwrap();
    respond(&mut w, &mut conv, "r2");
    w.add(
        &mut conv,
        "a3".into(),
        Content::AssistantText("Anything else?".into()),
    )
    .unwrap();
    let events = drain(&rx);
    let r1_samples = events
        .iter()
        .find_map(|e| match e {
            ConvEvent::ReplyDone {
                item_id,
                audio_samples,
                ..
            } if item_id == "r1" => Some(*audio_samples),
            _ => None,
        })
        .unwrap();
    assert!(
        r1_samples >= 3 * 1920,
        "r1 has speech ({r1_samples} samples)"
    );

    // Beyond the end: an error, nothing changes.
    let len = conv.session.len();
    assert!(w.truncate(&mut conv, "r1", r1_samples + 1).is_err());
    assert_eq!(conv.session.len(), len);
    assert!(
        w.truncate(&mut conv, "u1", 0).is_err(),
        "a user turn has no speech to cut"
    );

    w.truncate(&mut conv, "r1", 2 * 1920 + 5).unwrap();
    let Body::Reply { tokens, .. } = &conv.entries[1].body else {
        panic!("r1 is a reply");
    };
    assert_eq!(
        tokens
            .iter()
            .filter(|t| matches!(t, Token::Audio(_)))
            .count(),
        3
    );
    assert!(matches!(
        drain(&rx).last(),
        Some(ConvEvent::Truncated { audio_samples, .. }) if *audio_samples == 3 * 1920
    ));
    assert_same_state(&conv.session, &fresh(&model, &conv, &[]));

    w.delete(&mut conv, "u2").unwrap();
    assert_eq!(
        conv.entries
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        ["u1", "r1", "r2", "a3"]
    );
    assert_same_state(&conv.session, &fresh(&model, &conv, &[]));
    assert!(w.delete(&mut conv, "u2").is_err(), "already gone");

    // New instructions: a new system turn and the same history after it.
    let mut s = setup(40);
    s.instructions = "Answer briefly.".into();
    w.configure(&mut conv, s).unwrap();
    assert_same_state(&conv.session, &fresh(&model, &conv, &[]));
}

/// When the context is full, the oldest turns go (one re-prefill) and the conversation goes on.
#[test]
fn a_full_context_drops_the_oldest_turns_and_goes_on() {
    let model = model();
    let mut w = worker(
        &model,
        EngineOptions {
            context_limit: Some(160),
        },
    );
    let (mut conv, rx) = open(&w, setup(30));
    let mut trimmed = Vec::new();
    for i in 0..8 {
        w.add(
            &mut conv,
            format!("u{i}"),
            Content::UserText(format!("Question number {i}, please answer it.")),
        )
        .unwrap();
        respond(&mut w, &mut conv, &format!("r{i}"));
        assert!(
            conv.session.len() <= 160,
            "{} positions",
            conv.session.len()
        );
        for e in drain(&rx) {
            if let ConvEvent::Trimmed { item_ids } = e {
                trimmed.extend(item_ids);
            }
        }
    }
    assert!(!trimmed.is_empty(), "the context filled up");
    assert_eq!(trimmed[0], "u0", "the oldest goes first");
    assert_eq!(conv.entries.last().unwrap().id, "r7");
    assert!(conv.entries.iter().all(|e| !trimmed.contains(&e.id)));
    assert_same_state(&conv.session, &fresh(&model, &conv, &[]));
}

const CALL: &str = "<|tool_call_start|>[get_current_time()]<|tool_call_end|>";

/// With the engine running tools: the call is parsed, the built-in tool runs, its result goes
/// back as a `tool` turn, and the model answers after it.
#[test]
fn a_tool_call_runs_the_tool_and_the_model_answers() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    w.force_reply(CALL);
    let mut s = setup(30);
    s.tools = dialog::tools::built_in();
    s.tool_policy = ToolPolicy::Run { max_rounds: 2 };
    let (mut conv, rx) = open(&w, s);
    w.add(
        &mut conv,
        "u1".into(),
        Content::UserText("What time is it?".into()),
    )
    .unwrap();
    respond(&mut w, &mut conv, "r1");
    let events = drain(&rx);
    let call = events.iter().find_map(|e| match e {
        ConvEvent::ToolCall {
            name, arguments, ..
        } => Some((name.clone(), arguments.clone())),
        _ => None,
    });
    assert_eq!(
        call,
        Some(("get_current_time".to_string(), "{}".to_string())),
        "{events:?}"
    );
    let result = events.iter().find_map(|e| match e {
        ConvEvent::ToolResult { output, ok, .. } => Some((output.clone(), *ok)),
        _ => None,
    });
    let (output, ok) = result.expect("the tool ran");
    assert!(ok && output.contains("\"time\""), "{output}");
    let done: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            ConvEvent::ReplyDone { item_id, .. } => Some(item_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(done, ["r1", "r1-1"], "the call, then the answer");
    assert!(
        !events.iter().any(|e| match e {
            ConvEvent::Text { piece, .. } => piece.contains("get_current"),
            ConvEvent::ReplyDone { text, .. } => text.contains("get_current"),
            _ => false,
        }),
        "the call's text is not shown: {events:?}"
    );
    let ids: Vec<&str> = conv.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    // The tool turn holds the result between the response markers.
    let tok = &model.tokenizer;
    let tool = &conv.entries[2];
    let text = tok
        .decode(
            &conv.session.items()[tool.start..tool.start + tool.len]
                .iter()
                .map(|i| match i {
                    Item::Text(id) => *id,
                    _ => 0,
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
    assert!(
        text.starts_with("<|im_start|>tool\n<|tool_response_start|>{")
            && text.ends_with("<|tool_response_end|><|im_end|>\n"),
        "{text:?}"
    );
    assert_same_state(&conv.session, &fresh(&model, &conv, &[]));
}

/// A malformed call and an unknown tool are told to the model and reported; nothing breaks.
#[test]
fn malformed_calls_and_unknown_tools_are_reported() {
    let model = model();
    for (forced, expect) in [
        (
            "<|tool_call_start|>[get_current_time(]<|tool_call_end|>",
            "malformed",
        ),
        (
            "<|tool_call_start|>[launch_rocket(at=\"moon\")]<|tool_call_end|>",
            "no tool named",
        ),
    ] {
        let mut w = worker(&model, EngineOptions::default());
        w.force_reply(forced);
        let mut s = setup(20);
        s.tools = dialog::tools::built_in();
        s.tool_policy = ToolPolicy::Run { max_rounds: 1 };
        let (mut conv, rx) = open(&w, s);
        w.add(&mut conv, "u1".into(), Content::UserText("Go.".into()))
            .unwrap();
        respond(&mut w, &mut conv, "r1");
        let events = drain(&rx);
        let failed = events.iter().find_map(|e| match e {
            ConvEvent::ToolResult { output, ok, .. } => Some((output.clone(), *ok)),
            _ => None,
        });
        let (output, ok) = failed.expect("a result goes back to the model");
        assert!(!ok && output.contains("error"), "{output}");
        let said = format!("{events:?}");
        assert!(said.contains(expect), "{said}");
        assert!(
            events
                .iter()
                .filter(|e| matches!(e, ConvEvent::ReplyDone { .. }))
                .count()
                == 2,
            "the model answers after the failure: {said}"
        );
    }
}

/// The text-to-speech benchmark seam: after a forced `<|audio_start|>` the reply goes on in
/// audio at once (the tiny model left to itself writes text for its first 3 steps).
#[test]
fn a_forced_audio_start_goes_on_in_speech() {
    let model = model();
    for forced in [None, Some("Hi.<|audio_start|>")] {
        let mut w = worker(&model, EngineOptions::default());
        if let Some(text) = forced {
            w.force_tts(text);
        }
        let mut s = setup(3);
        s.instructions = "Perform TTS. Use the UK female voice.".into();
        s.output = Output::Tts;
        let (mut conv, rx) = open(&w, s);
        w.add(&mut conv, "u1".into(), Content::UserText("Hi.".into()))
            .unwrap();
        respond(&mut w, &mut conv, "r1");
        let events = drain(&rx);
        let speech: usize = events
            .iter()
            .map(|e| match e {
                ConvEvent::Audio { samples, .. } => samples.len(),
                _ => 0,
            })
            .sum();
        let texts: Vec<&ConvEvent> = events
            .iter()
            .filter(|e| matches!(e, ConvEvent::Text { .. }))
            .collect();
        assert_eq!(
            speech > 0,
            forced.is_some(),
            "{forced:?}: {speech} samples, {texts:?}"
        );
    }
}

/// With the client running tools, the call is reported and the reply ends; the client's result
/// comes back as an item.
#[test]
fn reported_tool_calls_round_trip_through_the_client() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    w.force_reply("<|tool_call_start|>[get_weather(city=\"Paris\")]<|tool_call_end|>");
    let mut s = setup(20);
    s.tools = vec![dialog::tools::ToolSpec {
        name: "get_weather".into(),
        description: "Weather of a city.".into(),
        parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        command: vec![],
        timeout_secs: 1.0,
    }];
    let (mut conv, rx) = open(&w, s);
    w.add(&mut conv, "u1".into(), Content::UserText("Weather?".into()))
        .unwrap();
    respond(&mut w, &mut conv, "r1");
    let events = drain(&rx);
    let call_id = events
        .iter()
        .find_map(|e| match e {
            ConvEvent::ToolCall {
                call_id,
                name,
                arguments,
                ..
            } => {
                assert_eq!(name, "get_weather");
                assert_eq!(arguments, r#"{"city":"Paris"}"#);
                Some(call_id.clone())
            }
            _ => None,
        })
        .expect("a tool call");
    assert!(!events
        .iter()
        .any(|e| matches!(e, ConvEvent::ToolResult { .. })));
    let err = w
        .add(
            &mut conv,
            "out0".into(),
            Content::ToolResult {
                call_id: "call_made_up".into(),
                output: "{}".into(),
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("call_made_up"), "{err}");
    w.add(
        &mut conv,
        "out1".into(),
        Content::ToolResult {
            call_id,
            output: r#"{"forecast":"sunny"}"#.into(),
        },
    )
    .unwrap();
    respond(&mut w, &mut conv, "r2");
    let events = drain(&rx);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ConvEvent::ToolCall { .. })),
        "the seam forces only the first reply"
    );
    assert_same_state(&conv.session, &fresh(&model, &conv, &[]));
}

/// A cancel covers the replies asked for before it, queued ones too, and never a later one.
#[test]
fn a_cancel_covers_earlier_replies_only() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    let (mut conv, rx) = open(&w, setup(10));
    w.add(&mut conv, "u1".into(), Content::UserText("Hi.".into()))
        .unwrap();
    let len = conv.session.len();
    let seq = conv.cancel.ask();
    conv.cancel.cancel(Some(0));
    w.respond(
        &mut conv,
        seq,
        Respond {
            response_id: "r1".into(),
            item_id: "r1".into(),
            output: None,
        },
    )
    .unwrap();
    let events = drain(&rx);
    assert!(
        matches!(
            events.as_slice(),
            [
                ..,
                ConvEvent::ReplyDone {
                    cancelled: true,
                    audio_samples: 0,
                    ..
                }
            ]
        ),
        "{events:?}"
    );
    assert!(!events
        .iter()
        .any(|e| matches!(e, ConvEvent::ReplyStarted { .. })));
    assert_eq!(conv.session.len(), len, "nothing was said, nothing stays");
    respond(&mut w, &mut conv, "r2");
    assert!(drain(&rx).iter().any(|e| matches!(
        e,
        ConvEvent::ReplyDone {
            cancelled: false,
            ..
        }
    )));
}

/// The reference's greedy ASR of the clip, and whether it ended by itself (else it stopped at its
/// step limit and is a prefix of ours).
fn reference_transcript(model: &Lfm2AudioModel) -> (String, bool) {
    let path = fixture().join("../asr/what_time_16k.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let gen = &reference["generate"];
    let ids: Vec<u32> = gen["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["text"].as_u64().unwrap() as u32)
        .take_while(|&id| id != model.tokenizer.special().im_end)
        .collect();
    let want = strip_specials(&model.tokenizer.decode_readable(&ids).unwrap());
    (want.trim().to_owned(), !gen["im_end_at"].is_null())
}

fn assert_reference_transcript(model: &Lfm2AudioModel, text: &str) {
    let (want, ended) = reference_transcript(model);
    if ended {
        assert_eq!(text, want);
    } else {
        assert!(text.starts_with(&want), "{text:?} vs {want:?}");
    }
}

/// Input transcription is the reference's greedy ASR of the clip, and leaves the conversation
/// as it was.
#[test]
fn transcripts_match_the_reference_asr() {
    let model = model();
    let w = worker(&model, EngineOptions::default());
    let (conv, rx) = open(&w, setup(10));
    let len = conv.session.len();
    w.transcribe(&conv, "u1".into(), &clip(), false).unwrap();
    let text = match drain(&rx).as_slice() {
        [ConvEvent::Transcript { item_id, text }] if item_id == "u1" => text.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(conv.session.len(), len);
    assert_reference_transcript(&model, &text);
}

/// A background transcript gives way between any two steps (a few prompt positions or one
/// token), keeps what it did, and made in many sittings it is the reference's ASR, as made in
/// one; from the encoding its conversation item kept, or from the clip.
#[test]
fn a_background_transcript_gives_way_at_every_step_and_is_the_reference_asr() {
    let model = model();
    let w = worker(&model, EngineOptions::default());
    let (mut conv, _rx) = open(&w, setup(10));
    assert!(conv.encoded(&clip()).is_none());
    w.add(&mut conv, "u1".into(), Content::UserAudio(clip()))
        .unwrap();
    let kept = conv.encoded(&clip()).expect("the item's encoding is kept");
    let fresh = model.audio.embed(&clip()).unwrap();
    assert_eq!(
        kept.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        fresh.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );

    let encode = |audio: &[f32]| Ok(model.audio.embed(audio)?);
    let whole = Background::new(0, "u1".into(), clip())
        .resume(&model, encode, 448, || false)
        .unwrap()
        .expect("nothing asked it to stop");
    assert_reference_transcript(&model, &whole);

    for encoded in [Some(kept), None] {
        let mut bg = Background::new(0, "u1".into(), clip());
        let mut sittings = 0;
        let text = loop {
            // Each sitting is let through one check, so it makes exactly one step.
            let checks = std::cell::Cell::new(0);
            let before = bg.positions();
            let encoded = encoded.clone();
            let done = bg
                .resume(
                    &model,
                    |a: &[f32]| encoded.map_or_else(|| encode(a), Ok),
                    448,
                    || {
                        checks.set(checks.get() + 1);
                        checks.get() > 2
                    },
                )
                .unwrap();
            sittings += 1;
            assert!(
                bg.positions() - before <= super::background::PIECE,
                "one sitting went from {before} to {} positions",
                bg.positions()
            );
            if let Some(text) = done {
                break text;
            }
            assert!(sittings < 2000);
        };
        assert_eq!(text, whole);
        assert!(sittings > 10, "{sittings} sittings");
    }
}

/// An item whose deletion is asked while it is being added, with every reply asked so far
/// cancelled (a reply started on a pause, dropped when the user spoke on), is not finished: the
/// session stays as it was, and the item is reported added, then deleted, as if it had been.
/// With a reply asked since, which must see it, it is added whole.
#[test]
fn an_item_deleted_while_it_is_added_is_withdrawn_unless_a_reply_needs_it() {
    let model = model();
    let w = worker(&model, EngineOptions::default());
    let (mut conv, rx) = open(&w, setup(10));
    let len = conv.session.len();
    let entries = conv.entries.len();
    conv.cancel.ask();
    conv.cancel.cancel(Some(0));
    conv.cancel.deleting("u1");
    w.add(&mut conv, "u1".into(), Content::UserAudio(clip()))
        .unwrap();
    assert_eq!(conv.session.len(), len);
    assert_eq!(conv.entries.len(), entries);
    w.delete(&mut conv, "u1").unwrap();
    assert_eq!(
        drain(&rx),
        [
            ConvEvent::Added {
                item_id: "u1".into()
            },
            ConvEvent::Deleted {
                item_id: "u1".into()
            }
        ]
    );

    // A reply asked after the cancel: the item is added whole, and deleted for real.
    conv.cancel.ask();
    conv.cancel.deleting("u2");
    w.add(&mut conv, "u2".into(), Content::UserAudio(clip()))
        .unwrap();
    assert!(conv.session.len() > len);
    assert_eq!(conv.entries.len(), entries + 1);
    w.delete(&mut conv, "u2").unwrap();
    assert_eq!(conv.session.len(), len);
    assert_eq!(drain(&rx).len(), 2);
}

/// A streamed transcription sends the text in pieces as it is decoded, before the same whole
/// transcript as without streaming.
#[test]
fn a_streamed_transcript_comes_in_pieces_that_add_up_to_it() {
    let model = model();
    let w = worker(&model, EngineOptions::default());
    let (conv, rx) = open(&w, setup(10));
    w.transcribe(&conv, "u1".into(), &clip(), false).unwrap();
    let whole = match drain(&rx).as_slice() {
        [ConvEvent::Transcript { text, .. }] => text.clone(),
        other => panic!("{other:?}"),
    };
    w.transcribe(&conv, "u2".into(), &clip(), true).unwrap();
    let events = drain(&rx);
    let (last, pieces) = events.split_last().unwrap();
    let mut joined = String::new();
    for ev in pieces {
        match ev {
            ConvEvent::TranscriptDelta { item_id, text } if item_id == "u2" => {
                assert!(!text.is_empty());
                joined.push_str(text);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(pieces.len() > 1, "{} pieces of {whole:?}", pieces.len());
    match last {
        ConvEvent::Transcript { item_id, text } if item_id == "u2" => assert_eq!(text, &whole),
        other => panic!("{other:?}"),
    }
    assert_eq!(joined, whole);
}

/// The whole path through the engine thread: open, add, respond, events in order, close.
#[test]
fn the_engine_thread_serves_conversations_in_turn() {
    let model = model();
    let detok = codec::open_detokenizer(&fixture(), codec::DetokenizerChoice::Auto).unwrap();
    let (engine, thread) = spawn_with(model, detok, EngineOptions::default()).unwrap();
    let a = engine.open(setup(12)).unwrap();
    let b = engine.open(setup(12)).unwrap();
    for c in [&a, &b] {
        c.add("u1", Content::UserText("Hello.".into()));
        c.respond(Respond {
            response_id: "resp".into(),
            item_id: "r1".into(),
            output: Some(Output::Text),
        });
        c.delete("nope");
    }
    for c in [&a, &b] {
        let mut kinds = Vec::new();
        loop {
            let ev = c.events().recv_timeout(Duration::from_secs(60)).unwrap();
            let is_error = matches!(ev, ConvEvent::Error { .. });
            kinds.push(match ev {
                ConvEvent::Added { .. } => "added",
                ConvEvent::ReplyStarted { .. } => "started",
                ConvEvent::Text { .. } => "text",
                ConvEvent::Audio { .. } => "audio",
                ConvEvent::ReplyDone { .. } => "done",
                ConvEvent::Error { message, .. } => {
                    assert!(message.contains("no item \"nope\""), "{message}");
                    "error"
                }
                _ => "other",
            });
            if is_error {
                break;
            }
        }
        assert_eq!(kinds.first(), Some(&"added"));
        assert!(kinds.contains(&"done"), "{kinds:?}");
        assert!(
            !kinds.contains(&"audio"),
            "text output has no audio: {kinds:?}"
        );
    }
    drop(a);
    drop(b);
    engine.shutdown();
    thread.join().unwrap();
}

/// Jobs are taken in turn from each conversation, in order within each; a close drops its
/// conversation's queued jobs.
#[test]
fn the_queue_takes_conversations_in_turn() {
    use super::worker::FairQueue;
    let respond_job = |conv: u64, id: &str| Job::Respond {
        conv,
        seq: 1,
        respond: Respond {
            response_id: id.into(),
            item_id: id.into(),
            output: None,
        },
        speculative: false,
    };
    let add = |conv: u64, id: &str| Job::Add {
        conv,
        item_id: id.into(),
        content: Content::UserText("x".into()),
        place: Placement::End,
    };
    let name = |j: &Job| match j {
        Job::Respond { respond, .. } => format!("respond {}", respond.item_id),
        Job::Add { item_id, .. } => format!("add {item_id}"),
        Job::Transcribe { item_id, .. } => format!("transcribe {item_id}"),
        Job::Close { conv } => format!("close {conv}"),
        _ => "other".into(),
    };
    let mut q = FairQueue::default();
    // Conversation 1 floods the queue; conversation 2 asks for one reply.
    for i in 0..5 {
        q.push(add(1, &format!("a{i}")));
    }
    q.push(respond_job(1, "r1"));
    q.push(add(2, "b0"));
    q.push(respond_job(2, "r2"));
    q.push(Job::Transcribe {
        conv: 2,
        item_id: "b0".into(),
        audio: Vec::new(),
        stream: false,
        background: false,
    });
    let mut order = Vec::new();
    while let Some(j) = q.pop() {
        order.push(name(&j));
    }
    assert_eq!(
        order,
        [
            "add a0",
            "add b0",
            "add a1",
            "respond r2",
            "add a2",
            "transcribe b0",
            "add a3",
            "add a4",
            "respond r1"
        ]
    );
    let mut q = FairQueue::default();
    q.push(add(3, "c0"));
    q.push(respond_job(3, "r3"));
    q.push(Job::Close { conv: 3 });
    assert_eq!(q.pop().map(|j| name(&j)), Some("close 3".into()));
    assert!(q.pop().is_none() && q.is_empty());
}

/// An out-of-band reply leaves the conversation exactly as it was: the next reply is the one
/// the conversation would have made without it.
#[test]
fn an_out_of_band_reply_leaves_the_conversation_untouched() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    let (mut a, rx_a) = open(&w, setup(12));
    let (mut b, rx_b) = open(&w, setup(12));
    for conv in [&mut a, &mut b] {
        w.add(conv, "u1".into(), Content::UserText("Hello there.".into()))
            .unwrap();
    }
    let before: Vec<Item> = a.session.items().to_vec();
    let seq = a.cancel.ask();
    let oob = Respond {
        response_id: "oob".into(),
        item_id: "oob".into(),
        output: None,
    };
    let input = vec![(
        "in1".to_owned(),
        Content::UserText("Summarize the sea.".into()),
    )];
    w.respond_apart(&mut a, seq, oob, Some(input)).unwrap();
    let events = drain(&rx_a);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ConvEvent::ReplyDone { response_id, .. } if response_id == "oob")),
        "{events:?}"
    );
    assert_eq!(
        a.session.items(),
        &before[..],
        "the conversation's positions"
    );
    assert_eq!(a.entries.len(), 1);
    respond(&mut w, &mut a, "r");
    respond(&mut w, &mut b, "r");
    let reply = |rx: &Receiver<ConvEvent>| {
        drain(rx)
            .into_iter()
            .find_map(|e| match e {
                ConvEvent::ReplyDone {
                    text,
                    audio_samples,
                    ..
                } => Some((text, audio_samples)),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(reply(&rx_a), reply(&rx_b));
    assert_same_state(&a.session, &b.session);
}

/// Items put first or in the middle (a system item at the start, a user item after the first)
/// re-prefill what follows: the state equals a fresh prefill of the new order.
#[test]
fn items_placed_in_the_middle_equal_a_fresh_prefill() {
    let model = model();
    let w = worker(&model, EngineOptions::default());
    let (mut conv, _rx) = open(&w, setup(8));
    w.add(&mut conv, "u1".into(), Content::UserText("One.".into()))
        .unwrap();
    w.add(&mut conv, "u3".into(), Content::UserText("Three.".into()))
        .unwrap();
    w.insert(
        &mut conv,
        "s0".into(),
        Content::SystemText("Be terse.".into()),
        Placement::Start,
    )
    .unwrap();
    w.insert(
        &mut conv,
        "u2".into(),
        Content::UserText("Two.".into()),
        Placement::After("u1".into()),
    )
    .unwrap();
    let ids: Vec<&str> = conv.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["s0", "u1", "u2", "u3"]);
    assert_same_state(&conv.session, &fresh(&model, &conv, &[]));
    let e = w
        .insert(
            &mut conv,
            "x".into(),
            Content::UserText("?".into()),
            Placement::After("nope".into()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

/// A reply reports its usage; one cut by max_new_tokens says so.
#[test]
fn a_reply_reports_its_usage_and_whether_the_limit_cut_it() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    let (mut conv, rx) = open(&w, setup(4));
    w.add(&mut conv, "u1".into(), Content::UserText("Hello.".into()))
        .unwrap();
    let input = conv.session.len() as u64;
    respond(&mut w, &mut conv, "r1");
    let events = drain(&rx);
    let (usage, hit_limit) = events
        .iter()
        .find_map(|e| match e {
            ConvEvent::ReplyUsage {
                usage, hit_limit, ..
            } => Some((*usage, *hit_limit)),
            _ => None,
        })
        .expect("a ReplyUsage event");
    assert_eq!(usage.input_text + usage.input_audio, input);
    let Body::Reply { tokens, .. } = &conv.entries.last().unwrap().body else {
        panic!()
    };
    assert_eq!(usage.output_text + usage.output_audio, tokens.len() as u64);
    assert_eq!(hit_limit, tokens.len() >= 4, "{usage:?} {}", tokens.len());
    let done = events
        .iter()
        .position(|e| matches!(e, ConvEvent::ReplyDone { .. }))
        .unwrap();
    let used = events
        .iter()
        .position(|e| matches!(e, ConvEvent::ReplyUsage { .. }))
        .unwrap();
    assert!(used < done);
}

/// The daemon asks for the transcript of each user turn after its reply; the next turn's reply
/// must not wait for it (on a random model a transcript runs to its 448-token limit: seconds).
/// Queued behind a reply, the transcript comes after the next reply too, and still comes.
#[test]
fn a_queued_transcription_never_holds_up_the_next_reply() {
    let model = model();
    let detok = codec::open_detokenizer(&fixture(), codec::DetokenizerChoice::Auto).unwrap();
    let (engine, thread) = spawn_with(model, detok, EngineOptions::default()).unwrap();
    let c = engine.open(setup(24)).unwrap();
    let ask = |n: u32| {
        c.add(format!("u{n}"), Content::UserAudio(clip()));
        c.respond(Respond {
            response_id: format!("r{n}"),
            item_id: format!("r{n}"),
            output: None,
        });
    };
    // As the daemon queues them: turn 1, its transcript, turn 2 (all while turn 1 generates).
    ask(1);
    c.transcribe_when_idle("u1", clip());
    ask(2);
    let mut order = Vec::new();
    while order.len() < 3 {
        match c.events().recv_timeout(Duration::from_secs(120)).unwrap() {
            ConvEvent::ReplyDone { response_id, .. } => order.push(response_id),
            ConvEvent::Transcript { item_id, .. } => order.push(format!("transcript {item_id}")),
            ConvEvent::Error { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    assert_eq!(order, ["r1", "r2", "transcript u1"]);
    drop(c);
    engine.shutdown();
    thread.join().unwrap();
}

/// Without tools, a tool-call token in a reply (a random-weight model makes them) is text: the
/// reply goes on to its end, no call and no error is reported, and the words are kept.
#[test]
fn tool_call_tokens_without_tools_are_text() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    w.force_reply_without_tools("<|tool_call_start|>[get_current_time(]<|tool_call_end|>");
    let mut s = setup(20);
    s.output = Output::Text;
    let (mut conv, rx) = open(&w, s);
    w.add(&mut conv, "u1".into(), Content::UserText("Go.".into()))
        .unwrap();
    respond(&mut w, &mut conv, "r1");
    let events = drain(&rx);
    let said = format!("{events:?}");
    assert!(
        !events.iter().any(|e| matches!(
            e,
            ConvEvent::Error { .. } | ConvEvent::ToolCall { .. } | ConvEvent::ToolResult { .. }
        )),
        "{said}"
    );
    let text = events
        .iter()
        .find_map(|e| match e {
            ConvEvent::ReplyDone {
                text, cancelled, ..
            } => {
                assert!(!cancelled);
                Some(text.clone())
            }
            _ => None,
        })
        .expect("the reply ends");
    assert!(text.contains("get_current_time("), "{text:?}");
    let streamed: String = events
        .iter()
        .filter_map(|e| match e {
            ConvEvent::Text { piece, .. } => Some(piece.as_str()),
            _ => None,
        })
        .collect();
    assert!(streamed.contains("get_current_time("), "{streamed:?}");
}

/// A text conversation whose one tool, `nap`, sleeps `seconds` and answers "rested"; the engine
/// runs it, up to `max_rounds` rounds.
fn napping(seconds: u32, max_rounds: usize) -> Setup {
    let mut s = setup(12);
    s.output = Output::Text;
    s.tools = vec![dialog::tools::ToolSpec {
        name: "nap".into(),
        description: "Sleeps a while.".into(),
        parameters: serde_json::json!({"type": "object", "properties": {}}),
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("sleep {seconds}; echo rested"),
        ],
        timeout_secs: 30.0,
    }];
    s.tool_policy = ToolPolicy::Run { max_rounds };
    s
}

/// Tool commands run off the engine thread: while one conversation's tool sleeps, another
/// conversation's reply is generated and completes; the first goes on once its tool is back.
#[test]
fn a_slow_tool_never_stalls_another_conversation() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    w.force_reply("<|tool_call_start|>[nap()]<|tool_call_end|>");
    let (engine, thread) = super::spawn(w).unwrap();
    let a = engine.open(napping(2, 1)).unwrap();
    let mut quick = setup(4);
    quick.output = Output::Text;
    let b = engine.open(quick).unwrap();
    let ask = |c: &Conversation, id: &str| {
        c.add(format!("{id}-u"), Content::UserText("Hello.".into()));
        c.respond(Respond {
            response_id: id.into(),
            item_id: id.into(),
            output: None,
        });
    };
    let recv = |c: &Conversation| c.events().recv_timeout(Duration::from_secs(60)).unwrap();
    ask(&a, "a");
    // The call is made; the tool is running now.
    loop {
        match recv(&a) {
            ConvEvent::ToolCall { name, .. } => {
                assert_eq!(name, "nap");
                break;
            }
            ConvEvent::Error { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    ask(&b, "b");
    loop {
        match recv(&b) {
            ConvEvent::ReplyDone { cancelled, .. } => {
                assert!(!cancelled);
                break;
            }
            ConvEvent::Error { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    let so_far: Vec<ConvEvent> = a.events().try_iter().collect();
    assert!(
        !so_far
            .iter()
            .any(|e| matches!(e, ConvEvent::ToolResult { .. })),
        "the other conversation's reply waited for the tool: {so_far:?}"
    );
    // The tool's result comes back and the response goes on to its answer.
    let mut result = None;
    loop {
        match recv(&a) {
            ConvEvent::ToolResult { output, ok, .. } => result = Some((output, ok)),
            ConvEvent::ReplyDone { item_id, .. } if item_id == "a-1" => break,
            ConvEvent::Error { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    assert_eq!(result, Some(("rested".to_string(), true)));
    drop(a);
    drop(b);
    engine.shutdown();
    thread.join().unwrap();
}

/// The dialog manager's rule for the end of a response (`dialog::rounds`) counts the engine's
/// rounds: a reply whose call the engine runs ends a round; one whose call it does not run (the
/// rounds ran out) ends the response, with no result and an error saying why.
#[test]
fn the_dialog_counts_the_rounds_the_engine_runs() {
    use dialog::rounds::{Ending, RoundEnd, Rounds};
    let model = model();
    for max_rounds in [0, 1] {
        let mut w = worker(&model, EngineOptions::default());
        w.force_reply("<|tool_call_start|>[get_current_time()]<|tool_call_end|>");
        let mut s = setup(20);
        s.output = Output::Text;
        s.tools = dialog::tools::built_in();
        s.tool_policy = ToolPolicy::Run { max_rounds };
        let policy = s.tool_policy;
        let (mut conv, rx) = open(&w, s);
        w.add(&mut conv, "u1".into(), Content::UserText("Time?".into()))
            .unwrap();
        respond(&mut w, &mut conv, "r1");
        let events = drain(&rx);
        let mut rounds = Rounds::new(policy);
        let ends: Vec<(usize, RoundEnd)> = events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| rounds.event(e).map(|end| (i, end)))
            .collect();
        let said = format!("{events:?}");
        let results = events
            .iter()
            .filter(|e| matches!(e, ConvEvent::ToolResult { .. }))
            .count();
        let (last, end) = *ends.last().expect("the response ends");
        if max_rounds == 0 {
            assert_eq!(
                end,
                RoundEnd::Over(Ending::OutOfRounds { max_rounds: 0 }),
                "{said}"
            );
            assert_eq!((ends.len(), results), (1, 0), "{said}");
            assert!(said.contains("again after 0 rounds"), "{said}");
        } else {
            assert_eq!(ends[0].1, RoundEnd::ToolsRun { round: 1 }, "{said}");
            assert!(matches!(end, RoundEnd::Over(_)), "{said}");
            assert_eq!(results, 1, "{said}");
        }
        assert!(
            !events[last + 1..].iter().any(|e| e.response_id().is_some()),
            "nothing of the response after its end: {said}"
        );
    }
}

/// A response cancelled while its tool runs ends with a cancelled ReplyDone: whoever waits for
/// its end is not left waiting.
#[test]
fn a_response_cancelled_while_its_tool_runs_says_it_ended() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    w.force_reply("<|tool_call_start|>[nap()]<|tool_call_end|>");
    let (engine, thread) = super::spawn(w).unwrap();
    let a = engine.open(napping(1, 2)).unwrap();
    a.add("u".to_owned(), Content::UserText("Hello.".into()));
    a.respond(Respond {
        response_id: "a".into(),
        item_id: "a".into(),
        output: None,
    });
    let recv = || a.events().recv_timeout(Duration::from_secs(60)).unwrap();
    // The call's round is over; the tool runs now.
    loop {
        if let ConvEvent::ReplyDone { item_id, .. } = recv() {
            assert_eq!(item_id, "a");
            break;
        }
    }
    a.cancel(None);
    loop {
        match recv() {
            ConvEvent::ReplyDone {
                item_id,
                cancelled,
                text,
                ..
            } => {
                assert_eq!((item_id.as_str(), cancelled), ("a-1", true));
                assert!(text.is_empty());
                break;
            }
            ConvEvent::Text { .. } | ConvEvent::ReplyStarted { .. } => {
                panic!("the answer round began after the cancel")
            }
            _ => {}
        }
    }
    drop(a);
    engine.shutdown();
    thread.join().unwrap();
}

/// Three conversations ask for a reply at once. The replies are generated together, a step of
/// each in turn, so each starts before any is over: none waits for another to end. Each reply,
/// its speech included, is the one its conversation makes alone with the same seed, and each
/// conversation's state is the one it has alone.
#[test]
fn replies_of_three_conversations_interleave_and_each_is_as_alone() {
    let model = model();
    let setups: Vec<Setup> = [(8, 1), (40, 2), (12, 3)]
        .into_iter()
        .map(|(max, seed)| {
            let mut s = setup(max);
            s.params.audio = SamplingParams::new(Some(1.0), Some(4));
            s.params.seed = seed;
            s
        })
        .collect();
    let question = |i: usize| Content::UserText(format!("Hello, this is caller {i}."));

    // What one reply's events say: (text, samples, samples kept).
    let reply_of = |events: &[ConvEvent], id: &str| {
        let mut samples = Vec::new();
        let mut done = None;
        for e in events {
            match e {
                ConvEvent::Audio {
                    response_id,
                    samples: s,
                } if response_id == id => samples.extend_from_slice(s),
                ConvEvent::ReplyDone {
                    response_id,
                    text,
                    audio_samples,
                    cancelled,
                    ..
                } if response_id == id => {
                    assert!(!cancelled);
                    done = Some((text.clone(), *audio_samples));
                }
                ConvEvent::Error { message, .. } => panic!("{message}"),
                _ => {}
            }
        }
        let (text, kept) = done.expect("the reply ends");
        (text, samples, kept)
    };

    // Each alone.
    let mut alone = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let mut w = worker(&model, EngineOptions::default());
        let (mut conv, rx) = open(&w, s.clone());
        w.add(&mut conv, "u1".into(), question(i)).unwrap();
        respond(&mut w, &mut conv, &format!("r{i}"));
        let events = drain(&rx);
        let steps = events
            .iter()
            .filter(|e| matches!(e, ConvEvent::Text { .. } | ConvEvent::Audio { .. }))
            .count();
        alone.push((reply_of(&events, &format!("r{i}")), conv, steps));
    }
    // The premise of the order below: the first reply is the shortest.
    assert!(
        alone[0].0 .1.len() < alone[1].0 .1.len() && alone[0].2 < alone[1].2,
        "reply 0 is shorter than reply 1"
    );

    // Together, all asked for before the engine runs.
    let mut w = worker(&model, EngineOptions::default());
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    for (i, s) in setups.iter().enumerate() {
        let (done, _) = crossbeam_channel::bounded(1);
        let conv = i as u64 + 1;
        jobs_tx
            .send(Job::Open {
                conv,
                setup: s.clone(),
                events: events_tx.clone(),
                cancel: Arc::new(Cancel::default()),
                done,
            })
            .unwrap();
        jobs_tx
            .send(Job::Add {
                conv,
                item_id: "u1".into(),
                content: question(i),
                place: Placement::End,
            })
            .unwrap();
    }
    for i in 0..3 {
        jobs_tx
            .send(Job::Respond {
                conv: i as u64 + 1,
                seq: 1,
                respond: Respond {
                    response_id: format!("r{i}"),
                    item_id: format!("r{i}"),
                    output: None,
                },
                speculative: false,
            })
            .unwrap();
    }
    drop((jobs_tx, events_tx));
    w.run(jobs_rx);
    let events: Vec<ConvEvent> = events_rx.try_iter().collect();

    let at = |kind: &str, id: &str| {
        events
            .iter()
            .position(|e| match e {
                ConvEvent::ReplyStarted { response_id, .. } => kind == "start" && response_id == id,
                ConvEvent::ReplyDone { response_id, .. } => kind == "done" && response_id == id,
                _ => false,
            })
            .unwrap_or_else(|| panic!("no {kind} of {id}"))
    };
    assert!(at("start", "r1") < at("done", "r0"), "r1 runs beside r0");
    assert!(
        at("start", "r2") < at("done", "r0"),
        "r2 runs beside r0 and r1: it waits for no reply to end"
    );
    for (i, ((text, samples, kept), conv, _)) in alone.iter().enumerate() {
        let (t, s, k) = reply_of(&events, &format!("r{i}"));
        assert_eq!((&t, k), (text, *kept), "reply {i}");
        assert!(s == *samples, "reply {i}: the speech differs from alone");
        let together = w.conversation(i as u64 + 1).unwrap();
        assert_same_state(&together.session, &conv.session);
    }
}

/// The text and speech of a reply, from its events.
fn said(events: &[ConvEvent]) -> (String, Vec<f32>) {
    let mut text = String::new();
    let mut audio = Vec::new();
    for e in events {
        match e {
            ConvEvent::Text { piece, .. } => text.push_str(piece),
            ConvEvent::Audio { samples, .. } => audio.extend_from_slice(samples),
            _ => {}
        }
    }
    (text, audio)
}

/// A speculative reply (started on the utterance so far, when the user paused) that is
/// abandoned because the user spoke on leaves no trace: the whole utterance is then answered
/// exactly as if it had been answered directly (same words, same speech, same state), with a
/// sampled (not greedy) reply, so the seed must not have moved either.
#[test]
fn an_abandoned_speculative_reply_leaves_no_trace() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    let mut sampled = setup(40);
    sampled.params.text = SamplingParams::new(Some(1.0), Some(40));
    sampled.params.audio = SamplingParams::new(Some(1.0), Some(40));
    sampled.params.seed = 7;
    let wave = clip();
    let partial = wave[..wave.len() * 2 / 3].to_vec();

    // Directly: the whole utterance, answered.
    let (mut direct, drx) = open(&w, sampled.clone());
    w.add(
        &mut direct,
        "user-1".into(),
        Content::UserAudio(wave.clone()),
    )
    .unwrap();
    respond(&mut w, &mut direct, "reply-1");
    let want = said(&drain(&drx));
    assert!(!want.1.is_empty(), "the reply speaks");

    // Speculatively: the part before the pause is answered until its first speech, then the
    // user speaks on: the reply is cancelled with nothing heard and the partial turn deleted.
    let (mut spec, rx) = open(&w, sampled);
    w.add(&mut spec, "user-1".into(), Content::UserAudio(partial))
        .unwrap();
    let before = spec.session.len();
    let cancel = Arc::clone(&spec.cancel);
    let watcher = std::thread::spawn(move || {
        let mut events = Vec::new();
        for ev in rx.iter() {
            if let ConvEvent::Audio { .. } = ev {
                cancel.cancel(Some(0));
            }
            let done = matches!(ev, ConvEvent::ReplyDone { .. });
            events.push(ev);
            if done {
                return (events, rx);
            }
        }
        panic!("no ReplyDone");
    });
    respond(&mut w, &mut spec, "reply-1");
    let (events, rx) = watcher.join().unwrap();
    assert!(
        events.iter().any(|e| matches!(e, ConvEvent::Audio { .. })),
        "the speculative reply got as far as its first speech"
    );
    assert!(matches!(
        events.last(),
        Some(ConvEvent::ReplyDone {
            cancelled: true,
            audio_samples: 0,
            ..
        })
    ));
    assert_eq!(
        spec.session.len(),
        before,
        "the cancelled reply left nothing"
    );
    w.delete(&mut spec, "user-1").unwrap();
    w.add(&mut spec, "user-2".into(), Content::UserAudio(wave.clone()))
        .unwrap();
    respond(&mut w, &mut spec, "reply-2");
    let got = said(&drain(&rx));
    assert_eq!(got.0, want.0, "the same words");
    assert_eq!(got.1, want.1, "the same speech");
    assert_eq!(spec.entries.len(), direct.entries.len());
    for (g, d) in spec.entries.iter().zip(&direct.entries) {
        if let (Body::Reply { tokens: g, .. }, Body::Reply { tokens: d, .. }) = (&g.body, &d.body) {
            assert_eq!(g, d, "the same reply tokens");
        }
    }
    assert_same_state(&spec.session, &direct.session);
}

/// The tool calls of a reply asked for speculatively (on a pause, before the turn is certain)
/// wait for the turn: reported, not run; the confirmation runs them and the response goes on to
/// its answer; a reply undone (deleted once over, or cancelled) never runs them, not even on a
/// late confirmation.
#[test]
fn tools_of_a_speculative_reply_wait_for_the_turn() {
    let model = model();
    let mut w = worker(&model, EngineOptions::default());
    w.force_reply("<|tool_call_start|>[mark()]<|tool_call_end|>");
    let (engine, thread) = super::spawn(w).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open_marking = |name: &str| {
        let path = dir.path().join(name);
        let mut s = setup(12);
        s.output = Output::Text;
        s.tools = vec![dialog::tools::ToolSpec {
            name: "mark".into(),
            description: "Leaves a mark.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {}}),
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("echo marked > '{}'", path.display()),
            ],
            timeout_secs: 30.0,
        }];
        s.tool_policy = ToolPolicy::Run { max_rounds: 1 };
        (engine.open(s).unwrap(), path)
    };
    let ask = |c: &Conversation, id: &str| {
        c.add(format!("{id}-u"), Content::UserText("Hello.".into()));
        c.respond_speculatively(Respond {
            response_id: id.into(),
            item_id: id.into(),
            output: None,
        });
    };
    // The events up to the end of the reply item `item`.
    let until_done = |c: &Conversation, item: &str| {
        let mut events = Vec::new();
        loop {
            let ev = c.events().recv_timeout(Duration::from_secs(60)).unwrap();
            if let ConvEvent::Error { message, .. } = &ev {
                panic!("{message}");
            }
            let done = matches!(&ev, ConvEvent::ReplyDone { item_id, .. } if item_id == item);
            events.push(ev);
            if done {
                return events;
            }
        }
    };
    let settle = || std::thread::sleep(Duration::from_millis(700));

    // Confirmed: the call waits, then runs, and the response goes on.
    let (a, a_mark) = open_marking("a");
    ask(&a, "a");
    let events = until_done(&a, "a");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ConvEvent::ToolCall { name, .. } if name == "mark")),
        "the call is reported: {events:?}"
    );
    settle();
    assert!(
        !a_mark.exists(),
        "the tool ran before the turn was confirmed"
    );
    a.confirm("a");
    let events = until_done(&a, "a-1");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ConvEvent::ToolResult { ok: true, .. })),
        "{events:?}"
    );
    assert_eq!(std::fs::read_to_string(&a_mark).unwrap().trim(), "marked");

    // Undone once over: the reply and its turn are deleted.
    let (b, b_mark) = open_marking("b");
    ask(&b, "b");
    until_done(&b, "b");
    b.delete("b");
    b.delete("b-u");
    b.confirm("b");
    // Undone by a cancel that came after the end.
    let (c, c_mark) = open_marking("c");
    ask(&c, "c");
    until_done(&c, "c");
    c.cancel(Some(0));
    c.delete("c-u");
    c.confirm("c");
    // Each conversation has done all of that once a later item is in.
    for conv in [&b, &c] {
        conv.add("later", Content::UserText("And then?".into()));
        loop {
            match conv.events().recv_timeout(Duration::from_secs(60)).unwrap() {
                ConvEvent::Added { item_id } if item_id == "later" => break,
                ConvEvent::ToolResult { .. } => panic!("an undone reply's tool ran"),
                ConvEvent::Error { message, .. } => panic!("{message}"),
                _ => {}
            }
        }
    }
    settle();
    assert!(!b_mark.exists(), "the deleted reply's tool never runs");
    assert!(!c_mark.exists(), "the cancelled reply's tool never runs");
    drop((a, b, c));
    engine.shutdown();
    thread.join().unwrap();
}
