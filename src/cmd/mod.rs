pub mod generate;
pub mod transcribe;
