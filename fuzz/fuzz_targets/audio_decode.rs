//! The audio-file decode entry point (`AudioFileReader`, every format the decoder knows): any file
//! gives samples or an error for that file; a panic inside the decoder crate is caught there and
//! must not reach this target.
#![no_main]

use std::io::Write;

use audio_io::decode::AudioFileReader;
use libfuzzer_sys::fuzz_target;

/// Most samples read from one input: a few compressed bytes may describe hours of audio.
const MAX_SAMPLES: usize = 1 << 22;

fuzz_target!(|data: &[u8]| {
    // The reader takes a path; a fresh file per input (the first byte picks the extension hint).
    let ext = match data.first().map(|b| b % 5) {
        Some(0) => "wav",
        Some(1) => "flac",
        Some(2) => "mp3",
        Some(3) => "ogg",
        _ => "bin",
    };
    let mut file = match tempfile::Builder::new()
        .suffix(&format!(".{ext}"))
        .tempfile()
    {
        Ok(f) => f,
        Err(_) => return,
    };
    if file.write_all(data).and_then(|_| file.flush()).is_err() {
        return;
    }
    let Ok(mut reader) = AudioFileReader::open(file.path()) else {
        return;
    };
    let mut total = 0;
    while let Ok(Some(chunk)) = reader.next_chunk() {
        total += chunk.len();
        if total > MAX_SAMPLES {
            break;
        }
    }
});
