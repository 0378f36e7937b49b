//! One module per scenario. Each takes what it needs (an [`crate::api::Api`], a pool, a
//! launcher) and returns a serialisable result; none asserts anything about timings.

pub mod catchup;
pub mod ceiling;
pub mod closed_loop;
pub mod commands;
pub mod follow;
pub mod freshness;
pub mod long_stream;
pub mod rebuild;
