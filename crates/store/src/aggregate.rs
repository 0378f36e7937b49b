//! Loading an order's state for `decide`: its latest valid snapshot plus the events after it.

use crate::read::read_stream;
use crate::snapshot::load_snapshot;
use events::{
    DecodeError, OrderState, STATE_SCHEMA_VERSION, decode_recorded, evolve, order_stream_id,
};
use sqlx::PgPool;
use uuid::Uuid;

/// Events read per query while catching up after a snapshot; bounds memory for long streams.
const LOAD_PAGE: i64 = 1_000;

/// An order's state and how it was obtained.
#[derive(Debug, Clone)]
pub struct LoadedOrder {
    pub state: OrderState,
    /// Version of the snapshot the load started from, if one was used.
    pub snapshot_version: Option<i64>,
    /// Events folded after the snapshot.
    pub events_replayed: usize,
    /// The id of the event at `state.version` (`None` for an order with no events): what an
    /// append decided on this state names as the stream's last event
    /// ([`crate::ExpectedVersion::Head`]).
    pub last_event_id: Option<Uuid>,
}

/// Why an order could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("stored event at version {version} of order {order_id} is unreadable: {source}")]
    Corrupt {
        order_id: Uuid,
        version: i64,
        source: DecodeError,
    },
    /// The event was written by a newer release than this build
    /// ([`DecodeError::needs_newer_release`]): not damage, and an instance of that release can
    /// load the order.
    #[error(
        "event at version {version} of order {order_id} was written by a newer release than \
         this instance ({source})"
    )]
    NewerRelease {
        order_id: Uuid,
        version: i64,
        source: DecodeError,
    },
}

impl crate::session::SessionLost for LoadError {
    fn session_lost(&self) -> bool {
        matches!(self, LoadError::Database(e) if crate::session::is_lost(e))
    }
}

/// Loads an order (the default state, version 0, when it has no events). A load that met a
/// pooled session a server restart ended is made again on another ([`crate::session`]).
pub async fn load_order(pool: &PgPool, order_id: Uuid) -> Result<LoadedOrder, LoadError> {
    crate::session::read_again_on_lost_session(pool, || load_order_once(pool, order_id)).await
}

async fn load_order_once(pool: &PgPool, order_id: Uuid) -> Result<LoadedOrder, LoadError> {
    let stream_id = order_stream_id(order_id);
    let snapshot = load_snapshot::<OrderState>(pool, &stream_id, STATE_SCHEMA_VERSION).await?;
    let snapshot_version = snapshot.as_ref().map(|(version, _)| *version);
    let mut state = match snapshot {
        // The stored state must claim the version it was stored at; anything else is ignored.
        Some((version, state)) if state.version == version => state,
        _ => OrderState::default(),
    };
    let snapshot_version =
        snapshot_version.filter(|version| *version == state.version && *version > 0);
    let mut events_replayed = 0;
    let mut last_event_id = None;
    // From the snapshot's own event on: its id names the state when nothing follows it, at the
    // cost of one more row in the read the load makes anyway instead of another round trip.
    let mut after = state.version.saturating_sub(1);
    loop {
        let page = read_stream(pool, &stream_id, after, LOAD_PAGE).await?;
        let page_len = page.len();
        for event in &page {
            after = event.stream_version;
            last_event_id = Some(event.event_id);
            if event.stream_version <= state.version {
                continue;
            }
            let decoded = decode_recorded(event).map_err(|source| {
                let version = event.stream_version;
                if source.needs_newer_release() {
                    LoadError::NewerRelease {
                        order_id,
                        version,
                        source,
                    }
                } else {
                    LoadError::Corrupt {
                        order_id,
                        version,
                        source,
                    }
                }
            })?;
            state = evolve(state, &decoded);
            events_replayed += 1;
        }
        if (page_len as i64) < LOAD_PAGE {
            break;
        }
    }
    Ok(LoadedOrder {
        state,
        snapshot_version,
        events_replayed,
        last_event_id,
    })
}
