//! The engine thread: the only place the model runs. It owns the model, the conversation's
//! session and the detokenizer; everything else talks to it through channels.
//!
//! A user turn is prefilled on top of the conversation so far (history is never recomputed),
//! then the reply is generated item by item: text goes out as it is decoded, audio frames go
//! through the streaming detokenizer and out as 24 kHz samples. Between two decode steps the
//! engine looks at the cancel flag, so an interruption stops generation within one step; the
//! assistant's turn is then cut to what the user heard (`played` samples) and closed, and the
//! session equals a fresh prefill of that shorter history.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use codec::Detokenizer;
use crossbeam_channel::{Receiver, Sender};
use dialog::reply::{Cut, ReplyItem, ReplyTracker};
use lfm2_audio::depthformer::END_OF_AUDIO;
use lfm2_audio::generate::{prefill_chat, GenerationMode, GenerationParams, Generator, Token};
use lfm2_audio::model::Lfm2AudioModel;
use lfm2_audio::prompt::ChatState;
use lfm2_audio::session::Session;
use lfm2_audio::tokenizer::TextStream;

/// What the engine is asked to do.
#[derive(Debug)]
pub enum Request {
    /// A user turn of 16 kHz mono speech.
    UserAudio(Vec<f32>),
    Shutdown,
}

/// What the engine reports.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// A reply has begun; `prefill_ms` is the time from the request to its first item.
    ReplyStarted { turn: u64, prefill_ms: f64 },
    /// Readable text of the reply as it grows.
    Text { turn: u64, piece: String },
    /// 24 kHz samples of the reply.
    Audio { turn: u64, samples: Vec<f32> },
    /// The reply is complete (or was cut): what stays in the conversation.
    ReplyDone {
        turn: u64,
        text: String,
        frames: usize,
        cancelled: bool,
    },
    /// Something went wrong with this request; the conversation continues.
    Error(String),
}

/// Shared between the engine and whoever may interrupt it.
#[derive(Debug, Default)]
pub struct Interrupt {
    cancel: AtomicBool,
    /// Samples of the current reply the user had heard when it was interrupted.
    played: AtomicU64,
}

impl Interrupt {
    /// Stops the reply in progress, keeping `played` samples of it.
    pub fn interrupt(&self, played: u64) {
        self.played.store(played, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
    }

    fn take(&self) -> Option<u64> {
        self.cancel
            .swap(false, Ordering::SeqCst)
            .then(|| self.played.load(Ordering::SeqCst))
    }
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub system_prompt: String,
    pub params: GenerationParams,
}

/// The conversation state the engine keeps.
struct Conversation {
    session: Session,
    turn: u64,
}

pub struct Engine {
    model: Arc<Lfm2AudioModel>,
    detok: Box<dyn Detokenizer>,
    cfg: EngineConfig,
    interrupt: Arc<Interrupt>,
    events: Sender<EngineEvent>,
    conv: Conversation,
    /// The items of the last reply that stayed in the conversation.
    kept: Vec<Token>,
}

impl Engine {
    pub fn new(
        model: Arc<Lfm2AudioModel>,
        detok: Box<dyn Detokenizer>,
        cfg: EngineConfig,
        interrupt: Arc<Interrupt>,
        events: Sender<EngineEvent>,
    ) -> anyhow::Result<Self> {
        let mut engine = Self {
            conv: Conversation {
                session: Session::new(model.backbone.clone())?,
                turn: 0,
            },
            model,
            detok,
            cfg,
            interrupt,
            events,
            kept: Vec::new(),
        };
        engine.start_conversation()?;
        Ok(engine)
    }

    /// `<|startoftext|>` and the system turn.
    fn start_conversation(&mut self) -> anyhow::Result<()> {
        let tok = &self.model.tokenizer;
        let mut chat = ChatState::new(tok)?;
        if !self.cfg.system_prompt.is_empty() {
            chat.new_turn(tok, "system")?;
            chat.add_text(tok, &self.cfg.system_prompt)?;
            chat.end_turn(tok)?;
        }
        self.conv.session = Session::new(self.model.backbone.clone())?;
        prefill_chat(&mut self.conv.session, &chat)?;
        Ok(())
    }

    /// Serves requests until `Shutdown` or the channel closes.
    pub fn run(mut self, requests: Receiver<Request>) {
        while let Ok(req) = requests.recv() {
            let result = match req {
                Request::Shutdown => break,
                Request::UserAudio(audio) => self.user_turn(Some(audio), None),
            };
            if let Err(e) = result {
                let _ = self.events.send(EngineEvent::Error(format!("{e:#}")));
            }
        }
    }

    /// One user turn and the reply to it.
    pub fn user_turn(
        &mut self,
        audio: Option<Vec<f32>>,
        text: Option<String>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        // An interruption that came before this turn is not for it.
        self.interrupt.take();
        let model = Arc::clone(&self.model);
        let tok = &model.tokenizer;
        let mut turn = ChatState::empty();
        turn.new_turn(tok, "user")?;
        if let Some(audio) = audio {
            turn.add_audio(model.audio.embed(&audio)?)?;
        }
        if let Some(text) = text {
            turn.add_text(tok, &text)?;
        }
        turn.end_turn(tok)?;
        turn.new_turn(tok, "assistant")?;
        let needed = turn.len() + 1;
        anyhow::ensure!(
            self.conv.session.remaining() > needed,
            "the conversation is full ({} positions); reset it",
            self.conv.session.len()
        );
        let before = self.conv.session.len();
        let emb = turn.embeddings(model.backbone.as_ref(), 0)?;
        let hidden = match self.conv.session.prefill(&emb, turn.items()) {
            Ok(h) => h,
            Err(e) => {
                self.conv.session.truncate_to(before)?;
                return Err(e.into());
            }
        };
        let hidden = hidden.get(hidden.dim(0)? - 1)?;
        self.conv.turn += 1;
        let turn_id = self.conv.turn;
        let reply_start = self.conv.session.len();
        let mode = GenerationMode::Interleaved {
            n_text: model.config.interleaved_n_text,
            n_audio: model.config.interleaved_n_audio,
        };
        let params = GenerationParams {
            seed: self.cfg.params.seed.wrapping_add(turn_id),
            ..self.cfg.params
        };
        let head = Arc::clone(&self.model.audio_head);
        let mut gen = Generator::new(
            &mut self.conv.session,
            &head,
            tok.special(),
            mode,
            params,
            hidden,
        );
        let mut tracker = ReplyTracker::new(reply_start);
        let mut text_ids = Vec::new();
        let mut stream = TextStream::new();
        let mut pcm = Vec::with_capacity(codec::SAMPLES_PER_FRAME);
        let mut first = true;
        self.detok.reset();
        let mut cut: Option<Cut> = None;
        let mut items: Vec<Token> = Vec::new();
        loop {
            if let Some(played) = self.interrupt.take() {
                let c = tracker.cut(played);
                // The last item may not have run through the model yet; the cut may need it.
                if c.position > gen.session().len() {
                    gen.feed_pending()?;
                }
                cut = Some(c);
                break;
            }
            let Some(token) = gen.next_item()? else { break };
            items.push(token.clone());
            if first {
                first = false;
                let _ = self.events.send(EngineEvent::ReplyStarted {
                    turn: turn_id,
                    prefill_ms: started.elapsed().as_secs_f64() * 1e3,
                });
            }
            match token {
                Token::Text(id) => {
                    tracker.push(ReplyItem::Text(id));
                    text_ids.push(id);
                    if let Some(piece) = stream.push(tok, id)? {
                        // Special tokens are markers, not words.
                        let piece: String = strip_specials(&piece);
                        if !piece.is_empty() {
                            let _ = self.events.send(EngineEvent::Text {
                                turn: turn_id,
                                piece,
                            });
                        }
                    }
                }
                Token::Audio(frame) => {
                    let audible = !frame.contains(&END_OF_AUDIO);
                    tracker.push(ReplyItem::Frame { audible });
                    if audible {
                        let f: codec::Frame = frame
                            .as_slice()
                            .try_into()
                            .map_err(|_| anyhow::anyhow!("a frame of {} codes", frame.len()))?;
                        pcm.clear();
                        self.detok.push_into(&f, &mut pcm)?;
                        let _ = self.events.send(EngineEvent::Audio {
                            turn: turn_id,
                            samples: pcm.clone(),
                        });
                    }
                }
            }
        }
        match cut {
            Some(c) => {
                drop(gen);
                items.truncate(c.position - reply_start);
                self.kept = items;
                self.detok.reset();
                self.conv.session.truncate_to(c.position)?;
                self.close_turn()?;
                let text = strip_specials(&tok.decode_readable(&c.text)?);
                let _ = self.events.send(EngineEvent::ReplyDone {
                    turn: turn_id,
                    text,
                    frames: c.frames,
                    cancelled: true,
                });
            }
            None => {
                // Everything yielded goes into the history, as the reference's `append` does.
                gen.feed_pending()?;
                drop(gen);
                self.kept = items;
                pcm.clear();
                self.detok.flush_into(&mut pcm)?;
                if !pcm.is_empty() {
                    let _ = self.events.send(EngineEvent::Audio {
                        turn: turn_id,
                        samples: pcm.clone(),
                    });
                }
                self.close_turn()?;
                let text = strip_specials(&tok.decode_readable(&text_ids)?);
                let _ = self.events.send(EngineEvent::ReplyDone {
                    turn: turn_id,
                    text,
                    frames: tracker.audible_frames(),
                    cancelled: false,
                });
            }
        }
        Ok(())
    }

    /// `<|im_end|>\n` after the assistant's reply.
    fn close_turn(&mut self) -> anyhow::Result<()> {
        let tok = &self.model.tokenizer;
        let ids = tok.encode("<|im_end|>\n")?;
        self.conv.session.prefill_text(&ids)?;
        Ok(())
    }
}

fn strip_specials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<|") {
        out.push_str(&rest[..start]);
        match rest[start..].find("|>") {
            Some(end) => rest = &rest[start + end + 2..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lfm2_audio::prompt::Item;
    use lfm2_audio::sampling::SamplingParams;
    use std::path::Path;

    fn clip() -> Vec<f32> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio/what_time_16k.wav");
        let (wave, _) = audio_io::decode::read_mono(&path).unwrap();
        wave
    }

    /// A barge-in truncates the assistant's turn to the frames that were played (and the text
    /// before them), and the conversation is then exactly a fresh prefill of that history.
    #[test]
    fn barge_in_leaves_the_state_of_a_fresh_prefill_of_what_was_heard() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-c/model");
        let model = Arc::new(Lfm2AudioModel::load(&dir).unwrap());
        let detok = codec::open_detokenizer(&dir, codec::DetokenizerChoice::Auto).unwrap();
        let params = GenerationParams {
            max_new_tokens: 60,
            text: SamplingParams::GREEDY,
            audio: SamplingParams::GREEDY,
            seed: 0,
        };
        let system = "Respond with interleaved text and audio.".to_string();
        let interrupt = Arc::new(Interrupt::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut engine = Engine::new(
            Arc::clone(&model),
            detok,
            EngineConfig {
                system_prompt: system.clone(),
                params,
            },
            Arc::clone(&interrupt),
            tx,
        )
        .unwrap();

        // The listener interrupts after the third piece of audio, having heard 2.5 frames.
        let watcher = {
            let interrupt = Arc::clone(&interrupt);
            std::thread::spawn(move || {
                let mut audio = 0;
                for ev in rx.iter() {
                    if let EngineEvent::Audio { .. } = ev {
                        audio += 1;
                        if audio == 3 {
                            interrupt.interrupt(4800);
                        }
                    }
                    if let EngineEvent::ReplyDone {
                        frames, cancelled, ..
                    } = ev
                    {
                        return (frames, cancelled);
                    }
                }
                (0, false)
            })
        };
        let wave = clip();
        engine.user_turn(Some(wave.clone()), None).unwrap();
        let (frames, cancelled) = watcher.join().unwrap();
        assert!(cancelled, "the reply was interrupted");
        assert_eq!(frames, 3, "ceil(4800 / 1920) frames were heard");
        assert_eq!(
            engine
                .kept
                .iter()
                .filter(|t| matches!(t, Token::Audio(_)))
                .count(),
            3
        );

        // The same history, prefilled from scratch.
        let tok = &model.tokenizer;
        let mut chat = ChatState::new(tok).unwrap();
        chat.new_turn(tok, "system").unwrap();
        chat.add_text(tok, &system).unwrap();
        chat.end_turn(tok).unwrap();
        chat.new_turn(tok, "user").unwrap();
        chat.add_audio(model.audio.embed(&wave).unwrap()).unwrap();
        chat.end_turn(tok).unwrap();
        chat.new_turn(tok, "assistant").unwrap();
        let mut fresh = Session::new(model.backbone.clone()).unwrap();
        prefill_chat(&mut fresh, &chat).unwrap();
        for t in &engine.kept {
            match t {
                Token::Text(id) => drop(fresh.step_text(*id).unwrap()),
                Token::Audio(f) => drop(
                    fresh
                        .step(
                            &model.audio_head.frame_embedding(f).unwrap(),
                            Item::AudioOut,
                        )
                        .unwrap(),
                ),
            }
        }
        fresh
            .prefill_text(&tok.encode("<|im_end|>\n").unwrap())
            .unwrap();

        let got = engine.conv.session.state().caches().unwrap();
        let want = fresh.state().caches().unwrap();
        assert_eq!(engine.conv.session.len(), fresh.len());
        for (g, w) in got.iter().zip(&want) {
            let diff = (g - w)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let scale = w
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-5 * scale.max(1e-6),
                "cache differs: {diff} (scale {scale})"
            );
        }
        // And the conversation goes on from there.
        engine.user_turn(Some(wave), None).unwrap();
        assert!(engine.conv.session.len() > fresh.len());
    }
}
