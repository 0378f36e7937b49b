//! # events
//!
//! The pure heart of the system: no I/O, no async, no database or Redis types.
//!
//! # Layout
//! - [`envelope`]: the stored and published shape of an event ([`RecordedEvent`]) and its
//!   [`EventMetadata`] (correlation, causation, command id, actor, W3C traceparent).
//! - [`money`]: parsed value types (currency, SKU) and the limits on quantities and text.
//! - [`order`]: the Order aggregate: commands, events, state, `decide` and `evolve`.
//! - [`codec`]: event type names, schema versions, JSON encoding and upcasting on read.
//! - [`summary`]: the order summary fold shared by the projector, time travel and `verify`.
//!
//! Everything here is deterministic, so every process folds the same events into the same state.

pub mod codec;
pub mod envelope;
pub mod money;
pub mod order;
pub mod summary;

pub use codec::{
    DecodeError, current_schema_version, decode, decode_recorded, written_by_newer_release,
};
pub use envelope::{EventMetadata, NewEvent, RecordedEvent, order_id_of_stream, order_stream_id};
pub use order::{
    DomainError, LineItem, Order, OrderCommand, OrderEvent, OrderState, OrderStatus, Rule,
    STATE_SCHEMA_VERSION, decide, evolve,
};
pub use summary::{FoldError, OrderSummary, SummaryFold, fold_summary};
