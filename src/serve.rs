//! `lfm2d serve`: picks the daemon's front ends from the flags and the configuration: the
//! Wyoming server and/or the Realtime API server (no sound devices), or the voice assistant on
//! the microphone and speaker, or one of the other modes (live transcription, translation,
//! reading text aloud). What they share is set up in [`crate::daemon::setup`]; this module sits
//! above all of them and nothing imports it but `main`.

use crate::daemon::console::stamp;
use crate::daemon::setup::{engine_options, load, resolve, Args, Loaded, Mode};
use crate::daemon::{modes, shutdown, voice};
use crate::engine;

pub fn run(args: Args) -> anyhow::Result<()> {
    // From here on SIGINT and SIGTERM stop the daemon cleanly (see `shutdown`).
    let stop = shutdown::install()?;
    if let Some(address) = crate::wyoming::wanted(&args)? {
        return crate::wyoming::run(&args, &address, args.listen.as_deref(), &stop);
    }
    if let Some(listen) = &args.listen {
        return crate::realtime::run(&args, listen, &stop);
    }
    let r = resolve(&args)?;
    let cfg = &r.cfg;
    let Loaded {
        dir: model_dir,
        quant,
        model,
        detok,
    } = load(&args, cfg)?;
    eprintln!(
        "{} model loaded from {} ({quant:?}), mode {:?}",
        stamp(r.start),
        model_dir.display(),
        r.mode
    );
    let (engine, engine_thread) = engine::spawn_with(model, detok, engine_options(cfg))?;
    shutdown::running();
    let result = match r.mode {
        Mode::Assistant => voice::assistant(&args, &r, &engine, &stop),
        Mode::Transcribe | Mode::Translate => {
            modes::transcribe_or_translate(&args, &r, &engine, &stop)
        }
        Mode::Speak => modes::speak(&args, &r, &engine, &stop),
    };
    engine.shutdown();
    shutdown::join(engine_thread, "the engine");
    result
}
