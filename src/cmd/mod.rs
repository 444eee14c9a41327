pub mod bench;
pub mod chat;
pub mod devices;
pub mod fetch;
pub mod generate;
pub mod listen;
pub mod runtime;
pub mod speak;
pub mod speech;
pub mod synth_model;
pub mod transcribe;

/// The directory of the running executable (for finding assets next to a build).
pub fn exe_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_owned()))
        .unwrap_or_default()
}
