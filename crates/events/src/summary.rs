//! The order summary: the read-side view of one order, folded from its recorded events.
//!
//! The `order_summaries` projection stores exactly this fold, the query service computes it from
//! the event store for time travel, and `projector verify` compares the two; keeping the one fold
//! here is what makes them agree.

use crate::codec::{DecodeError, decode_recorded};
use crate::envelope::{RecordedEvent, order_id_of_stream};
use crate::order::{LineItem, OrderState, OrderStatus, evolve};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The read model of one order (the body of `GET /orders/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderSummary {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub status: OrderStatus,
    /// ISO 4217 code.
    pub currency: String,
    pub items: Vec<LineItem>,
    /// Sum of `quantity * unit_price` in minor units.
    pub total: i64,
    /// Number of lines (not units).
    pub item_count: i64,
    /// Stream version of the last event folded in.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Why a sequence of events could not be folded into a summary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(
        "event at version {found} of `{stream_id}` does not follow version {expected_previous}"
    )]
    OutOfOrder {
        stream_id: String,
        expected_previous: i64,
        found: i64,
    },
    #[error("`{stream_id}` does not start with OrderCreated")]
    NotCreated { stream_id: String },
}

impl FoldError {
    /// Whether an event of the sequence was written by a newer release than this build
    /// ([`DecodeError::needs_newer_release`]).
    pub fn needs_newer_release(&self) -> bool {
        matches!(self, FoldError::Decode(e) if e.needs_newer_release())
    }
}

/// A summary under construction: the domain state plus the timestamps only the envelopes carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryFold {
    pub state: OrderState,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl SummaryFold {
    /// Starts from an existing summary (the stored read model row).
    pub fn from_summary(summary: &OrderSummary) -> Self {
        let order = crate::order::Order {
            order_id: summary.order_id,
            customer_id: summary.customer_id,
            currency: crate::money::Currency::from_stored(&summary.currency),
            status: summary.status,
            items: summary.items.clone(),
        };
        Self {
            state: OrderState {
                order: Some(order),
                version: summary.version,
            },
            created_at: Some(summary.created_at),
            updated_at: Some(summary.updated_at),
        }
    }

    /// Applies the next event of the stream; it must be exactly the next version.
    pub fn apply(&mut self, event: &RecordedEvent) -> Result<(), FoldError> {
        if event.stream_version != self.state.version + 1 {
            return Err(FoldError::OutOfOrder {
                stream_id: event.stream_id.clone(),
                expected_previous: self.state.version,
                found: event.stream_version,
            });
        }
        let decoded = decode_recorded(event)?;
        let state = std::mem::take(&mut self.state);
        self.state = evolve(state, &decoded);
        if self.state.order.is_none() {
            return Err(FoldError::NotCreated {
                stream_id: event.stream_id.clone(),
            });
        }
        self.created_at.get_or_insert(event.recorded_at);
        self.updated_at = Some(event.recorded_at);
        Ok(())
    }

    /// The summary so far, if the order exists.
    pub fn summary(&self) -> Option<OrderSummary> {
        let order = self.state.order.as_ref()?;
        Some(OrderSummary {
            order_id: order.order_id,
            customer_id: order.customer_id,
            status: order.status,
            currency: order.currency.as_str().to_owned(),
            items: order.items.clone(),
            total: order.total().unwrap_or(i64::MAX),
            item_count: i64::try_from(order.items.len()).unwrap_or(i64::MAX),
            version: self.state.version,
            created_at: self.created_at?,
            updated_at: self.updated_at?,
        })
    }
}

/// Folds a whole stream (in version order, from version 1) into its summary.
pub fn fold_summary<'a>(
    events: impl IntoIterator<Item = &'a RecordedEvent>,
) -> Result<Option<OrderSummary>, FoldError> {
    let mut fold = SummaryFold::default();
    for event in events {
        fold.apply(event)?;
    }
    Ok(fold.summary())
}

/// The order id of a recorded event's stream, if it is an order stream.
pub fn order_id_of(event: &RecordedEvent) -> Option<Uuid> {
    order_id_of_stream(&event.stream_id)
}
