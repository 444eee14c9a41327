//! SIGINT (Ctrl-C) and SIGTERM. Once the daemon runs, the first one asks it to stop: the serve
//! loop (or the Realtime server) leaves, cancels what the engine is doing, closes the sound
//! devices and connections and prints its summary; that takes well under a second, and a
//! watchdog ends the process if it ever does not. Before the daemon runs (loading the model)
//! the process ends at once (status 0), and at a second signal too (status 128 + the signal).

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Set once a loop listens for the stop request.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// How long a clean stop may take before the watchdog ends the process.
const WATCHDOG: Duration = Duration::from_millis(950);

/// Installs the handlers (they replace an inherited "ignore", as a shell gives a background
/// job for SIGINT). Returns the channel on which the stop request (the signal) arrives.
pub fn install() -> anyhow::Result<Receiver<i32>> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen > 1 {
                    eprintln!("{}: stopping at once", name(sig));
                    std::process::exit(128 + sig);
                }
                if !RUNNING.load(Ordering::SeqCst) {
                    // Still starting: nothing is open that needs closing.
                    eprintln!("{}: stopped while starting", name(sig));
                    std::process::exit(0);
                }
                let _ = tx.try_send(sig);
                let _ = std::thread::Builder::new()
                    .name("stop-watchdog".into())
                    .spawn(move || {
                        std::thread::sleep(WATCHDOG);
                        eprintln!(
                            "{}: the daemon did not stop within {WATCHDOG:?}; exiting",
                            name(sig)
                        );
                        std::process::exit(1);
                    });
            }
        })?;
    Ok(rx)
}

/// From now on a signal is a request to stop cleanly, sent on the channel.
pub fn running() {
    RUNNING.store(true, Ordering::SeqCst);
}

/// Waits for a thread to end, at most half a second (it may be in the middle of a step that
/// cannot be cut short; the process ends without it then).
pub fn join(thread: JoinHandle<()>, what: &str) {
    let deadline = Instant::now() + Duration::from_millis(500);
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            eprintln!("{what} did not stop within 0.5 s; not waiting for it");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = thread.join();
}

/// The name of a signal, for messages.
pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Runs the network servers (`servers`: binding, announcing and serving) on a two-thread async
/// runtime until they end or a stop request arrives on `stop`; then drops the connections still
/// open (their conversations cancel what the engine does for them), stops the engine and says
/// which signal stopped it. Shared by `serve --listen` and `serve --wyoming`.
pub fn serve_until_stopped(
    servers: impl std::future::Future<Output = anyhow::Result<()>>,
    stop: &Receiver<i32>,
    engine: crate::engine::EngineHandle,
    engine_thread: JoinHandle<()>,
    started: Instant,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stop = stop.clone();
    let result = runtime.block_on(async move {
        running();
        // SIGINT/SIGTERM: stop accepting; the connections close with the runtime below.
        let signal = tokio::task::spawn_blocking(move || stop.recv().unwrap_or(0));
        tokio::select! {
            r = servers => r.map(|()| None),
            sig = signal => Ok(Some(sig.unwrap_or(0))),
        }
    });
    runtime.shutdown_timeout(Duration::from_millis(300));
    engine.shutdown();
    join(engine_thread, "the engine");
    if let Some(sig) = result? {
        eprintln!(
            "[{:>8.2}s] stopped ({})",
            started.elapsed().as_secs_f64(),
            name(sig)
        );
    }
    Ok(())
}
