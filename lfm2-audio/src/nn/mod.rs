//! The layers the model's networks share: linear maps and embedding tables (in f32 or
//! block-quantized), RMSNorm and LayerNorm, the SwiGLU feed-forward and rotary position tables.
//!
//! Users: the LFM2 stack ([`crate::lfm2`]: the backbone and the LFM2 audio detokenizer), the
//! depthformer, the conformer encoder and codec's Mimi decoder. Each layer loads its weights by
//! name from [`crate::weights::Weights`] with shape checks, and has a batched path on tensors
//! (`forward`) and, where the decode loops need it, a one-position path on slices
//! (`forward_vec`).

mod feed_forward;
mod linear;
mod norm;
mod rotary;

pub use feed_forward::FeedForward;
pub use linear::{forward_vec_many, Linear, Table};
pub use norm::{LayerNorm, RmsNorm};
pub use rotary::Rotary;
