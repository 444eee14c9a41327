//! lfm2d: an offline speech-to-speech voice assistant for Liquid AI's LFM2-Audio models.

use clap::{Parser, Subcommand};

mod bench_peer;
mod cmd;
mod config;
mod daemon;
mod engine;
mod model_cache;
mod realtime;
mod serve;
mod voices;
mod wyoming;

#[derive(Parser)]
#[command(
    name = "lfm2d",
    version,
    about = "Offline speech-to-speech assistant for LFM2-Audio"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a text prompt (text in, streamed text out).
    Generate(cmd::generate::Args),
    /// Transcribe audio files (speech recognition), streaming the text.
    Transcribe(cmd::transcribe::Args),
    /// Answer a spoken question with speech (interleaved text and audio).
    Chat(cmd::chat::Args),
    /// Read text aloud with a voice preset.
    Speak(cmd::speak::Args),
    /// The voice assistant: listen on the microphone and answer out loud (or, with --listen,
    /// serve the OpenAI-Realtime-compatible WebSocket API).
    Serve(daemon::setup::Args),
    /// Measure speed and memory on this machine (a table of medians).
    Bench(cmd::bench::Args),
    /// Download an official checkpoint into the Hugging Face cache (resumable, checksum-verified).
    FetchModel(cmd::fetch::Args),
    /// Write a random-weight checkpoint with the real model's shapes (for benchmarks and demos).
    SynthModel(cmd::synth_model::Args),
    /// List the sound devices (inputs and outputs) with their index and default format.
    Devices(cmd::devices::Args),
    /// Live view of the microphone: level, voice activity, utterance boundaries.
    Listen(cmd::listen::Args),
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    short_candle_spin();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Transcribe(args) => cmd::transcribe::run(args),
        Command::SynthModel(args) => cmd::synth_model::run(args),
        Command::FetchModel(args) => cmd::fetch::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Speak(args) => cmd::speak::run(args),
        Command::Devices(args) => cmd::devices::run(args),
        Command::Listen(args) => cmd::listen::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Keeps the memory of large freed buffers in the process instead of returning it to the
/// system at once. A prefill allocates and frees tensors of up to `positions x 8192` floats (16 MB
/// for 512 positions) in every layer; with glibc's defaults they came from fresh `mmap`s or a heap
/// trimmed after each free, and the kernel zeroed their pages again on every first touch (page
/// faults were 4-5 % of a prefill's samples). Buffers up to 64 MiB now come from the heap, which
/// is trimmed only when 256 MiB lie free at its top. The peak memory is unchanged.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

/// How long (in `pause` instructions) a worker of candle's own thread pool spins for the next job
/// before it sleeps: candle's default, 25 000, is about half a millisecond on Zen 3. Its workers
/// run the small f32 operations between our quantized products (norms, activations, attention),
/// and each then spun on a core that our product's threads needed: on the two cores of an AMD
/// EPYC, 13 % of the encoder's samples were that spin. 1000 still catches operations that follow
/// each other at once. `CANDLE_BARRIER_POOL_SPIN_LIMIT` set by the user is kept.
const CANDLE_SPIN_LIMIT: &str = "1000";

fn short_candle_spin() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // candle reads the variable when its pool starts, at its first parallel operation; this
        // runs first thing in `main`, before any thread exists.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
}
