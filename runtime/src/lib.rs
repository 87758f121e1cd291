//! The vlmc runtime: host tensors, the reference interpreter of the graph IR (the oracle every
//! compiled program is compared with), safetensors weights, parameter initialisation and model
//! inputs. Every allocation whose size the user decides goes through [`alloc`], so a model
//! too large for the machine is an error that names the tensor, never an abort.

pub mod adapter;
pub mod alloc;
pub mod chat;
pub mod cpu;
pub mod cuda;
pub mod export;
pub mod gemv;
pub mod generate;
pub mod hf_config;
pub mod init;
pub mod inputs;
pub mod interp;
pub mod plan;
pub mod rng;
pub mod sample;
pub mod spin;
pub mod tensor;
pub mod tensorboard;
pub mod train;
pub mod train_ckpt;
pub mod train_data;
pub mod train_draw;
pub mod train_dropout;
pub mod train_eval;
pub mod train_folder;
pub mod train_inputs;
pub mod train_loop;
pub mod train_pref;
pub mod train_stages;
pub mod train_uniform;
pub mod weight_set;
pub mod weights;

pub use interp::{run, RunError};
pub use tensor::{Data, Tensor};
pub use tokenizers;
/// Reading only regular files, writing atomically: [`vlmc::files`].
pub use vlmc::files;
