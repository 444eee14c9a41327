pub mod devices;
pub mod generate;
pub mod listen;
