//! The vlmc runtime: host tensors, the reference interpreter of the graph IR (the oracle every
//! compiled program is compared with), safetensors weights, parameter initialisation and model
//! inputs.

pub mod cpu;
pub mod cuda;
pub mod init;
pub mod inputs;
pub mod interp;
pub mod plan;
pub mod rng;
pub mod tensor;
pub mod train;
pub mod train_ckpt;
pub mod train_data;
pub mod train_dropout;
pub mod train_eval;
pub mod train_loop;
pub mod train_stages;
pub mod weights;

pub use interp::{run, RunError};
pub use tensor::{Data, Tensor};
