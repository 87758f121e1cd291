//! Code generators from the kernel IR ([`crate::kernel`]) to machine code.

pub mod cpu;
pub mod cuda;
