//! One reply from generation to sound: [`ReplyStream`] steps `lfm2-audio`'s [`Generation`] and
//! turns its audible frames into 24 kHz samples with a [`Detokenizer`], one event at a time.
//!
//! The end-of-audio rule lives here, once: a frame is decoded only when none of its codes is the
//! end-of-audio code ([`is_audible`]). The end-of-audio frame (code 2048 on codebook 0, which the
//! generation turns into all 2048 and which switches it back to text) and a frame that sampled
//! 2048 on a later codebook only are fed back to the model like any frame, but stay silent. The
//! decoder's stream runs across them; it is flushed once, when the reply ends.

use lfm2_audio::generate::{is_audible, Generation, Token};
pub use lfm2_audio::generate::{ReplyEnd, Token as GeneratedToken};
use lfm2_audio::session::Session;

use crate::{Detokenizer, Result};
use lfm2_audio::format::Frame;

/// What one [`ReplyStream::next`] yields.
#[derive(Debug, PartialEq)]
pub enum StreamEvent<'a> {
    /// A text token of the reply. A sequential reply yields its `<|im_end|>` too, as the
    /// reference does (it is never fed back); [`StreamEvent::End`] follows it.
    Text(u32),
    /// A generated audio frame, a code per codebook (fed back to the model at the next step).
    /// `audible` is false for the end-of-audio frame and for a frame holding the end-of-audio
    /// code elsewhere: those are never decoded.
    Frame { frame: Frame, audible: bool },
    /// Samples the decoder made final: after each audible frame (the next call after its
    /// [`StreamEvent::Frame`], unless the stream is muted or has no decoder), and what it held
    /// back when the reply ends.
    Pcm(&'a [f32]),
    /// The reply is over; later calls yield this again.
    End(ReplyEnd),
}

/// A reply being generated and decoded, stepped by [`ReplyStream::next`]. It holds no borrow of
/// the conversation: every call gets the session the reply started in, so a caller can keep
/// several streams (each with its own session and decoder) and step them in any order.
pub struct ReplyStream {
    generation: Generation,
    sink: Sink,
    end: Option<ReplyEnd>,
}

impl ReplyStream {
    /// A stream of `generation`, decoding with `detok` (reset first), or yielding frames only
    /// when `detok` is None (the caller decodes them elsewhere).
    pub fn new(generation: Generation, detok: Option<Box<dyn Detokenizer>>) -> Self {
        Self {
            generation,
            sink: Sink::new(detok),
            end: None,
        }
    }

    /// The next event of the reply: at most one backbone step (a text token or a frame), or
    /// one frame's decoding, or the decoder's flush at the end.
    pub fn next(&mut self, session: &mut Session) -> Result<StreamEvent<'_>> {
        if self.sink.undecoded.is_some() && self.sink.decode()? {
            return Ok(StreamEvent::Pcm(&self.sink.pcm));
        }
        if self.end.is_none() {
            match self.generation.next_item(session)? {
                Some(token) => return Ok(self.sink.accept(token)),
                None => {
                    self.end = Some(self.generation.end().unwrap_or(ReplyEnd::StopToken));
                }
            }
        }
        if self.sink.flush()? {
            return Ok(StreamEvent::Pcm(&self.sink.pcm));
        }
        Ok(StreamEvent::End(self.end.unwrap_or(ReplyEnd::StopToken)))
    }

    /// While muted, audible frames are yielded but not decoded (e.g. the speech of a tool call,
    /// which nobody hears).
    pub fn set_muted(&mut self, muted: bool) {
        self.sink.muted = muted;
    }

    /// Ends the reply here, before the generation's own end (e.g. after a tool call): returns
    /// what the decoder still held back. Later calls yield [`StreamEvent::End`].
    pub fn finish(&mut self) -> Result<&[f32]> {
        self.sink.undecoded = None;
        if self.end.is_none() {
            self.end = Some(self.generation.end().unwrap_or(ReplyEnd::StopToken));
        }
        Ok(if self.sink.flush()? {
            &self.sink.pcm
        } else {
            &[]
        })
    }

    /// Runs the backbone on the last yielded item if it has not run yet (see
    /// [`Generation::feed_pending`]): for a caller that stops before the end.
    pub fn feed_pending(&mut self, session: &mut Session) -> Result<()> {
        self.generation.feed_pending(session)?;
        Ok(())
    }

    /// The generation being stepped (steps taken, the mode, ...).
    pub fn generation(&self) -> &Generation {
        &self.generation
    }

    /// Why the reply ended, once [`StreamEvent::End`] was yielded.
    pub fn end(&self) -> Option<ReplyEnd> {
        self.end.filter(|_| self.sink.flushed)
    }

    /// Ends the stream where it is and hands back its decoder, reset (nothing it held back is
    /// decoded).
    pub fn into_detokenizer(self) -> Option<Box<dyn Detokenizer>> {
        let mut detok = self.sink.detok;
        if let Some(d) = detok.as_mut() {
            d.reset();
        }
        detok
    }
}

/// The decoding side of a stream: which frames are decoded, and when.
struct Sink {
    detok: Option<Box<dyn Detokenizer>>,
    muted: bool,
    /// An audible frame yielded but not decoded yet.
    undecoded: Option<Frame>,
    pcm: Vec<f32>,
    flushed: bool,
}

impl Sink {
    fn new(mut detok: Option<Box<dyn Detokenizer>>) -> Self {
        if let Some(d) = detok.as_mut() {
            d.reset();
        }
        Self {
            detok,
            muted: false,
            undecoded: None,
            pcm: Vec::with_capacity(crate::SAMPLES_PER_FRAME),
            flushed: false,
        }
    }

    /// The event of a generated token; an audible frame is kept to be decoded next.
    fn accept(&mut self, token: Token) -> StreamEvent<'static> {
        match token {
            Token::Text(id) => StreamEvent::Text(id),
            Token::Audio(frame) => {
                let audible = is_audible(&frame);
                if audible && !self.muted && self.detok.is_some() {
                    self.undecoded = Some(frame);
                }
                StreamEvent::Frame { frame, audible }
            }
        }
    }

    /// Decodes the frame kept by `accept` into `pcm`; whether samples came out.
    fn decode(&mut self) -> Result<bool> {
        let (Some(frame), Some(detok)) = (self.undecoded.take(), self.detok.as_mut()) else {
            return Ok(false);
        };
        self.pcm.clear();
        detok.push_into(&frame, &mut self.pcm)?;
        Ok(!self.pcm.is_empty())
    }

    /// Flushes the decoder into `pcm`, once; whether samples came out.
    fn flush(&mut self) -> Result<bool> {
        if self.flushed {
            return Ok(false);
        }
        self.flushed = true;
        self.pcm.clear();
        if let Some(detok) = self.detok.as_mut() {
            detok.flush_into(&mut self.pcm)?;
        }
        Ok(!self.pcm.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lfm2_audio::format::END_OF_AUDIO;

    fn tiny_c() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-c/model")
    }

    fn frame(seed: u32) -> Frame {
        std::array::from_fn(|c| (seed * 97 + c as u32 * 131) % 2048)
    }

    /// What a sink makes of `tokens`, then the end: (event kinds, samples).
    fn run(sink: &mut Sink, tokens: Vec<Token>) -> (Vec<String>, Vec<f32>) {
        let mut kinds = Vec::new();
        let mut samples = Vec::new();
        for t in tokens {
            kinds.push(match sink.accept(t) {
                StreamEvent::Text(id) => format!("text {id}"),
                StreamEvent::Frame { audible, .. } => format!("frame {audible}"),
                other => panic!("{other:?}"),
            });
            if sink.decode().unwrap() {
                kinds.push("pcm".into());
                samples.extend_from_slice(&sink.pcm);
            }
        }
        if sink.flush().unwrap() {
            kinds.push("pcm".into());
            samples.extend_from_slice(&sink.pcm);
        }
        assert!(!sink.flush().unwrap(), "flushed once");
        (kinds, samples)
    }

    #[test]
    fn only_frames_without_the_end_of_audio_code_are_decoded() {
        let detok = crate::open_detokenizer(&tiny_c(), crate::DetokenizerChoice::Lfm2).unwrap();
        let want = detok.decode(&[frame(1), frame(2), frame(3)]).unwrap();
        let mut late_eoa = frame(9);
        late_eoa[5] = END_OF_AUDIO;
        let tokens = vec![
            Token::Text(5),
            Token::Audio(frame(1)),
            // Sampled 2048 on a later codebook only: fed back, silent.
            Token::Audio(late_eoa),
            Token::Audio(frame(2)),
            // The end-of-audio frame.
            Token::Audio([END_OF_AUDIO; 8]),
            Token::Text(6),
            // Audio again after the end of audio: the decoder's stream goes on.
            Token::Audio(frame(3)),
        ];
        let mut sink = Sink::new(Some(detok));
        let (kinds, samples) = run(&mut sink, tokens.clone());
        assert_eq!(
            kinds,
            [
                "text 5",
                "frame true",
                "pcm",
                "frame false",
                "frame true",
                "pcm",
                "frame false",
                "text 6",
                "frame true",
                "pcm",
                "pcm"
            ]
        );
        // 1440 + 1920 + 1920 + the 480 held back: exactly the audible frames, as decoded in one
        // batch without the silent ones.
        assert_eq!(samples.len(), 3 * crate::SAMPLES_PER_FRAME);
        let diff = samples
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "stream vs batch: {diff}");

        // Muted frames and a stream without a decoder yield the same frames and no samples.
        let mut muted = Sink::new(Some(
            crate::open_detokenizer(&tiny_c(), crate::DetokenizerChoice::Lfm2).unwrap(),
        ));
        muted.muted = true;
        let (kinds_muted, samples) = run(&mut muted, tokens.clone());
        assert!(samples.is_empty());
        let frames_only = |k: &Vec<String>| -> Vec<String> {
            k.iter().filter(|k| *k != "pcm").cloned().collect()
        };
        assert_eq!(kinds_muted, frames_only(&kinds));
        let (kinds_none, samples) = run(&mut Sink::new(None), tokens);
        assert!(samples.is_empty());
        assert_eq!(kinds_none, frames_only(&kinds));
    }

    /// A real reply on tiny-c: the stream yields the generator's items, and its samples are the
    /// batch decode of the audible frames.
    #[test]
    fn a_stream_is_the_generator_plus_the_decoder() {
        use lfm2_audio::generate::{prefill_chat, GenerationMode, GenerationParams, Generator};
        use lfm2_audio::sampling::SamplingParams;
        let model = lfm2_audio::model::Lfm2AudioModel::load(&tiny_c()).unwrap();
        let chat = lfm2_audio::prompt::ChatState::text_chat(
            &model.tokenizer,
            Some("Respond with interleaved text and audio."),
            "Hello there.",
        )
        .unwrap();
        let mode = GenerationMode::Interleaved {
            n_text: model.config.interleaved_n_text,
            n_audio: model.config.interleaved_n_audio,
        };
        let params = GenerationParams {
            max_new_tokens: 40,
            text: SamplingParams::GREEDY,
            audio: SamplingParams::new(Some(1.0), Some(4)),
            seed: 3,
        };
        let special = model.tokenizer.special();
        let mut session = Session::new(model.backbone.clone()).unwrap();
        let hidden = prefill_chat(&mut session, &chat).unwrap();
        let mut want = Vec::new();
        let mut gen = Generator::new(
            &mut session,
            &model.audio_head,
            special,
            mode,
            params,
            hidden,
        );
        while let Some(t) = gen.next_item().unwrap() {
            want.push(t);
        }

        let mut session = Session::new(model.backbone.clone()).unwrap();
        let hidden = prefill_chat(&mut session, &chat).unwrap();
        let generation = Generation::new(model.audio_head.clone(), special, mode, params, hidden);
        let detok = crate::open_detokenizer(&tiny_c(), crate::DetokenizerChoice::Lfm2).unwrap();
        let mut stream = ReplyStream::new(generation, Some(detok));
        let (mut got, mut samples) = (Vec::new(), Vec::new());
        let end = loop {
            match stream.next(&mut session).unwrap() {
                StreamEvent::Text(id) => got.push(Token::Text(id)),
                StreamEvent::Frame { frame, .. } => got.push(Token::Audio(frame)),
                StreamEvent::Pcm(pcm) => samples.extend_from_slice(pcm),
                StreamEvent::End(end) => break end,
            }
        };
        assert_eq!(end, ReplyEnd::MaxTokens);
        assert_eq!(stream.end(), Some(ReplyEnd::MaxTokens));
        assert!(matches!(
            stream.next(&mut session).unwrap(),
            StreamEvent::End(_)
        ));
        assert_eq!(got, want);
        let audible: Vec<Frame> = want
            .iter()
            .filter_map(|t| match t {
                Token::Audio(f) if is_audible(f) => Some(*f),
                _ => None,
            })
            .collect();
        assert!(!audible.is_empty());
        let batch = stream.into_detokenizer().unwrap().decode(&audible).unwrap();
        assert_eq!(samples.len(), batch.len());
    }
}
