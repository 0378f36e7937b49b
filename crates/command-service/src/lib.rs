//! # command-service (being written)

pub mod relay;
