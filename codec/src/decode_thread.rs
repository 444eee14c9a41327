//! A [`Detokenizer`] on its own thread: frames go in as the model emits them, samples come out
//! in order, so that decoding overlaps generation instead of taking turns with it.
//!
//! Whether that helps depends on the cores: the model's matrix products already use every
//! core of the pool, so the decoder thread takes time from them unless it has a core to itself
//! or the products leave one waiting on memory. Give the detokenizer a pool of its own (one
//! thread) when it runs here, otherwise the two threads take turns on the shared pool's lock.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use lfm2_audio::format::{Frame, SAMPLES_PER_FRAME};

use crate::{Detokenizer, Error, Result};

enum Command {
    Frame(Frame),
    Flush,
    Reset,
}

/// What the decoder thread sends back, in the order of the commands.
#[derive(Debug)]
pub enum Decoded {
    /// The samples a pushed frame made final (possibly empty).
    Samples(Vec<f32>),
    /// The samples held back until the end of the stream; the decoder is ready for the next.
    Flushed(Vec<f32>),
    /// A frame or flush failed (the stream was reset, as [`Detokenizer`] says).
    Failed(Error),
}

/// A detokenizer running on a thread of its own, fed through a channel.
pub struct DecodeThread {
    commands: Option<Sender<Command>>,
    decoded: Receiver<Decoded>,
    spare: Sender<Vec<f32>>,
    handle: Option<JoinHandle<Box<dyn Detokenizer>>>,
}

impl DecodeThread {
    /// Starts a thread that owns `detokenizer` until [`DecodeThread::finish`].
    pub fn spawn(mut detokenizer: Box<dyn Detokenizer>) -> Result<Self> {
        let (commands, command_rx) = mpsc::channel::<Command>();
        let (decoded_tx, decoded) = mpsc::channel();
        let (spare, spare_rx) = mpsc::channel::<Vec<f32>>();
        let handle = std::thread::Builder::new()
            .name("lfm2d-detokenizer".into())
            .spawn(move || {
                for command in command_rx {
                    // Reuse a buffer the consumer gave back, if any.
                    let mut out = spare_rx
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(SAMPLES_PER_FRAME));
                    out.clear();
                    let reply = match command {
                        Command::Frame(frame) => match detokenizer.push_into(&frame, &mut out) {
                            Ok(_) => Decoded::Samples(out),
                            Err(e) => Decoded::Failed(e),
                        },
                        Command::Flush => match detokenizer.flush_into(&mut out) {
                            Ok(_) => Decoded::Flushed(out),
                            Err(e) => Decoded::Failed(e),
                        },
                        Command::Reset => {
                            detokenizer.reset();
                            continue;
                        }
                    };
                    if decoded_tx.send(reply).is_err() {
                        break;
                    }
                }
                detokenizer
            })
            .map_err(|e| Error::Invalid(format!("cannot start the detokenizer thread: {e}")))?;
        Ok(Self {
            commands: Some(commands),
            decoded,
            spare,
            handle: Some(handle),
        })
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands
            .as_ref()
            .and_then(|c| c.send(command).ok())
            .ok_or_else(|| Error::Invalid("the detokenizer thread has stopped".into()))
    }

    /// Queues a frame; its samples come back as [`Decoded::Samples`].
    pub fn push(&self, frame: Frame) -> Result<()> {
        self.send(Command::Frame(frame))
    }

    /// Queues the end of the stream; the held-back samples come back as [`Decoded::Flushed`].
    pub fn flush(&self) -> Result<()> {
        self.send(Command::Flush)
    }

    /// Queues a reset: the stream in progress is dropped (nothing comes back for it).
    pub fn reset(&self) -> Result<()> {
        self.send(Command::Reset)
    }

    /// The next result, waiting for it; `None` once the thread has stopped.
    pub fn recv(&self) -> Option<Decoded> {
        self.decoded.recv().ok()
    }

    /// The next result if one is ready.
    pub fn try_recv(&self) -> Option<Decoded> {
        self.decoded.try_recv().ok()
    }

    /// Hands a sample buffer back for reuse, so that steady decoding allocates nothing.
    pub fn recycle(&self, buffer: Vec<f32>) {
        let _ = self.spare.send(buffer);
    }

    /// Stops the thread after the commands already queued and returns the detokenizer.
    pub fn finish(mut self) -> Result<Box<dyn Detokenizer>> {
        self.commands = None;
        self.handle
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| Error::Invalid("the detokenizer thread panicked".into()))
    }
}

impl Drop for DecodeThread {
    fn drop(&mut self) {
        self.commands = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts frames; a frame of all 7s fails.
    struct Counter(usize);

    impl Detokenizer for Counter {
        fn lookahead(&self) -> usize {
            1
        }
        fn push_into(&mut self, frame: &Frame, out: &mut Vec<f32>) -> Result<usize> {
            if frame.iter().all(|&c| c == 7) {
                self.0 = 0;
                return Err(Error::Invalid("bad frame".into()));
            }
            self.0 += 1;
            out.extend([self.0 as f32, frame[0] as f32]);
            Ok(2)
        }
        fn flush_into(&mut self, out: &mut Vec<f32>) -> Result<usize> {
            out.push(-(self.0 as f32));
            self.0 = 0;
            Ok(1)
        }
        fn reset(&mut self) {
            self.0 = 0;
        }
        fn decode(&self, _: &[Frame]) -> Result<Vec<f32>> {
            Ok(Vec::new())
        }
    }

    fn samples(d: Option<Decoded>) -> Vec<f32> {
        match d {
            Some(Decoded::Samples(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn results_come_back_in_order() {
        let t = DecodeThread::spawn(Box::new(Counter(0))).unwrap();
        for code in [5, 6] {
            t.push([code; 8]).unwrap();
        }
        t.flush().unwrap();
        assert_eq!(samples(t.recv()), vec![1.0, 5.0]);
        let s = samples(t.recv());
        assert_eq!(s, vec![2.0, 6.0]);
        t.recycle(s);
        match t.recv() {
            Some(Decoded::Flushed(s)) => assert_eq!(s, vec![-2.0]),
            other => panic!("{other:?}"),
        }
        // A failing frame is reported and the stream starts over; a reset drops the stream.
        t.push([7; 8]).unwrap();
        assert!(matches!(t.recv(), Some(Decoded::Failed(_))));
        t.push([1; 8]).unwrap();
        t.reset().unwrap();
        t.push([2; 8]).unwrap();
        assert_eq!(samples(t.recv()), vec![1.0, 1.0]);
        assert_eq!(samples(t.recv()), vec![1.0, 2.0]);
        assert!(t.try_recv().is_none());
        let mut d = t.finish().unwrap();
        let mut out = Vec::new();
        d.flush_into(&mut out).unwrap();
        assert_eq!(out, vec![-1.0]);
    }
}
