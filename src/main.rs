//! lfm2d: an offline speech-to-speech voice assistant for Liquid AI's LFM2-Audio models.

use clap::{Parser, Subcommand};

mod cmd;

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
    /// List the sound devices (inputs and outputs) with their index and default format.
    Devices(cmd::devices::Args),
    /// Live view of the microphone: level, voice activity, utterance boundaries.
    Listen(cmd::listen::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
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
