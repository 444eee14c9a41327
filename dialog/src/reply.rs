//! The assistant's reply as it was generated, position by position, so that a barge-in can keep
//! exactly what the user heard.
//!
//! A reply is a sequence of text tokens and 80 ms audio frames, each occupying one backbone
//! position. When playback is cut after `n` samples, the frames whose sound had started playing
//! are kept, and with them the text generated before the last of them; the session is truncated
//! right after that item.

use lfm2_audio::format::SAMPLES_PER_FRAME;

/// One generated item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyItem {
    Text(u32),
    /// An audio frame; `audible` is false for the end-of-audio frame (it makes no sound).
    Frame {
        audible: bool,
    },
}

/// Where the session should be cut, and what survives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Session length to truncate to.
    pub position: usize,
    /// Text tokens kept.
    pub text: Vec<u32>,
    /// Audible frames kept.
    pub frames: usize,
}

/// The items of one reply and the session position of the first.
#[derive(Debug, Clone)]
pub struct ReplyTracker {
    start: usize,
    items: Vec<ReplyItem>,
}

impl ReplyTracker {
    /// A reply whose first item goes at session position `start`.
    pub fn new(start: usize) -> Self {
        Self {
            start,
            items: Vec::new(),
        }
    }

    pub fn push(&mut self, item: ReplyItem) {
        self.items.push(item);
    }

    pub fn items(&self) -> &[ReplyItem] {
        &self.items
    }

    pub fn audible_frames(&self) -> usize {
        self.items
            .iter()
            .filter(|i| matches!(i, ReplyItem::Frame { audible: true }))
            .count()
    }

    /// The cut after `played` samples were heard: every frame whose sound had begun is kept
    /// (`ceil(played / 1920)` frames), with the text generated before the last of them. With
    /// nothing played the user heard none of the reply, so the cut is at its start.
    pub fn cut(&self, played: u64) -> Cut {
        let heard = played.div_ceil(SAMPLES_PER_FRAME as u64) as usize;
        if heard == 0 {
            return Cut {
                position: self.start,
                text: Vec::new(),
                frames: 0,
            };
        }
        let mut frames = 0;
        let mut text = Vec::new();
        let mut pending_text = Vec::new();
        let mut end = 0;
        for (i, item) in self.items.iter().enumerate() {
            match item {
                ReplyItem::Text(id) => pending_text.push(*id),
                ReplyItem::Frame { audible } => {
                    if *audible {
                        if frames == heard {
                            break;
                        }
                        frames += 1;
                    }
                    text.append(&mut pending_text);
                    end = i + 1;
                }
            }
        }
        Cut {
            position: self.start + end,
            text,
            frames,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> ReplyTracker {
        // 2 text, 3 frames, 2 text, 2 frames, end-of-audio.
        let mut r = ReplyTracker::new(100);
        for item in [
            ReplyItem::Text(1),
            ReplyItem::Text(2),
            ReplyItem::Frame { audible: true },
            ReplyItem::Frame { audible: true },
            ReplyItem::Frame { audible: true },
            ReplyItem::Text(3),
            ReplyItem::Text(4),
            ReplyItem::Frame { audible: true },
            ReplyItem::Frame { audible: true },
            ReplyItem::Frame { audible: false },
        ] {
            r.push(item);
        }
        r
    }

    #[test]
    fn cut_keeps_heard_frames_and_the_text_before_them() {
        let r = reply();
        assert_eq!(
            r.cut(0),
            Cut {
                position: 100,
                text: vec![],
                frames: 0
            }
        );
        assert_eq!(
            r.cut(1),
            Cut {
                position: 103,
                text: vec![1, 2],
                frames: 1
            }
        );
        assert_eq!(
            r.cut(1920),
            Cut {
                position: 103,
                text: vec![1, 2],
                frames: 1
            }
        );
        assert_eq!(
            r.cut(1921),
            Cut {
                position: 104,
                text: vec![1, 2],
                frames: 2
            }
        );
        assert_eq!(
            r.cut(3 * 1920),
            Cut {
                position: 105,
                text: vec![1, 2],
                frames: 3
            }
        );
        assert_eq!(
            r.cut(3 * 1920 + 5),
            Cut {
                position: 108,
                text: vec![1, 2, 3, 4],
                frames: 4
            }
        );
        // Everything heard: the end-of-audio frame stays too.
        assert_eq!(
            r.cut(10 * 1920),
            Cut {
                position: 110,
                text: vec![1, 2, 3, 4],
                frames: 5
            }
        );
        assert_eq!(r.audible_frames(), 5);
    }
}
