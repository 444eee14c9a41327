//! `lfm2d devices`: the sound devices lfm2d can listen and speak through.

use anyhow::Context;
use audio_io::device::{list_devices, DeviceInfo};
use audio_io::Direction;

#[derive(clap::Args)]
pub struct Args {
    /// Also list the formats each device supports.
    #[arg(long, short)]
    verbose: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let inputs = list_devices(Direction::Input).context("listing input devices")?;
    let outputs = list_devices(Direction::Output).context("listing output devices")?;
    print_section(
        "Input devices (lfm2d listen --device NAME|INDEX)",
        &inputs,
        args.verbose,
    );
    println!();
    print_section("Output devices", &outputs, args.verbose);
    if inputs.is_empty() && outputs.is_empty() {
        anyhow::bail!(
            "no audio devices found: is a sound card connected, or a sound server (PulseAudio, \
             PipeWire) running?"
        );
    }
    Ok(())
}

fn print_section(title: &str, devices: &[DeviceInfo], verbose: bool) {
    println!("{title}:");
    if devices.is_empty() {
        println!("  (none)");
    }
    for device in devices {
        let format = device.default_format.as_ref().map_or_else(
            || "no default format".to_string(),
            |(f, sample)| format!("{f}, {sample}"),
        );
        let default = if device.is_default { " (default)" } else { "" };
        println!(
            "  #{:<2} {:<12} {}{default}  [{format}]",
            device.index, device.name, device.description
        );
        if verbose {
            println!("       id: {}", device.id);
            for range in &device.supported {
                println!("       {range}");
            }
        }
    }
}
