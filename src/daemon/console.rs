//! The daemon's console: the log lines, each stamped with the uptime and on a line of its own,
//! the assistant's words streaming on an open line, and the player's notices.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use audio_io::{Player, Speaker};

/// Whether stdout is in the middle of a line (the assistant's words as they stream).
pub(crate) static OPEN_LINE: AtomicBool = AtomicBool::new(false);

/// Ends the line the assistant's streamed words are on, if one is open: every other line of
/// the log starts on a line of its own.
pub(crate) fn end_open_line() {
    if OPEN_LINE.swap(false, Ordering::Relaxed) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out);
        let _ = out.flush();
    }
}

/// Seconds since the daemon started, for the log (every line of the log is stamped with it,
/// and starts on a line of its own).
pub(crate) fn stamp(start: Instant) -> String {
    end_open_line();
    format!("[{:>8.2}s]", start.elapsed().as_secs_f64())
}

/// The uptime (seconds, the clock of [`stamp`]) at which the microphone captured audio time
/// `t`, given a VAD event decided at audio time `decided` and sent `latency` after that
/// sample's capture.
pub(crate) fn uptime_of(start: Instant, t: Duration, decided: Duration, latency: Duration) -> f64 {
    start.elapsed().as_secs_f64() - latency.as_secs_f64() - decided.saturating_sub(t).as_secs_f64()
}

/// A diagnostic line (stderr).
pub(crate) fn log(line: String) {
    end_open_line();
    eprintln!("{line}");
}

/// The name of a signal, for the log.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    super::shutdown::name(sig)
}

/// Moves queued audio to the speaker (see [`Player::pump`]) and logs what it reports.
pub(crate) fn pump<P: Speaker>(player: &mut Player<P>, done: bool, start: Instant) {
    for notice in player.pump(done) {
        log(format!("{} {notice}", stamp(start)));
    }
}

/// A line of the conversation (stdout).
pub(crate) fn say(line: String) {
    end_open_line();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
