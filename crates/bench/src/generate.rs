//! Generating valid event stores fast: complete order lifecycles (and very long orders) decided
//! by the real aggregate (`events::decide`) and appended straight through `store::append_batch`
//! in big batches, so backlogs of a million events take seconds rather than hours of HTTP.

use std::time::{Duration, Instant};

use anyhow::Context;
use events::{EventMetadata, OrderCommand, OrderState, decide, evolve, order_stream_id};
use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use store::{AppendRequest, ExpectedVersion};
use uuid::Uuid;

/// Orders per append transaction (about 6 events each): big enough to amortise the round trip,
/// small enough to keep one statement's parameters a few MB.
pub const ORDERS_PER_BATCH: usize = 1_000;

/// Events per append transaction when writing one long stream.
pub const LONG_STREAM_BATCH: usize = 5_000;

/// Batches prepared and in flight at once: one building while another commits (appends
/// serialise on the store's lock anyway).
const BATCHES_IN_FLIGHT: usize = 2;

/// What a generation run wrote.
#[derive(Debug, Clone, Copy)]
pub struct Generated {
    pub events: u64,
    pub orders: u64,
    pub elapsed: Duration,
}

fn metadata() -> EventMetadata {
    EventMetadata {
        correlation_id: Some(Uuid::new_v4().to_string()),
        actor: Some("bench".into()),
        ..EventMetadata::default()
    }
}

/// Runs commands through `decide`/`evolve`, returning the events as an append request.
fn decided(
    order_id: Uuid,
    commands: &[OrderCommand],
) -> anyhow::Result<(AppendRequest, OrderState)> {
    let mut state = OrderState::default();
    let metadata = metadata();
    let mut new_events = Vec::with_capacity(commands.len());
    for command in commands {
        let decided = decide(&state, command)
            .map_err(|e| anyhow::anyhow!("generated command {} refused: {e}", command.name()))?;
        for event in decided {
            new_events.push(event.to_new_event(metadata.clone()));
            state = evolve(state, &event);
        }
    }
    Ok((
        AppendRequest {
            stream_id: order_stream_id(order_id),
            expected: ExpectedVersion::Exact(0),
            events: new_events,
            idempotency: None,
        },
        state,
    ))
}

/// The commands of the `n`-th generated order's whole lifecycle: create, 1-3 items, place,
/// pay, ship (or cancel one in five). 4-7 events.
pub fn lifecycle_commands(n: u64, order_id: Uuid, customer_id: Uuid) -> Vec<OrderCommand> {
    let items = 1 + (n % 3) as i64;
    let mut commands = vec![OrderCommand::CreateOrder {
        order_id,
        customer_id,
        currency: "EUR".into(),
    }];
    let mut total = 0;
    for line in 1..=items {
        commands.push(OrderCommand::AddItem {
            sku: format!("SKU-{line}"),
            quantity: line,
            unit_price: 250,
        });
        total += line * 250;
    }
    commands.push(OrderCommand::PlaceOrder);
    if n % 5 == 4 {
        commands.push(OrderCommand::CancelOrder {
            reason: "generated".into(),
        });
    } else {
        commands.push(OrderCommand::PayOrder {
            amount: total,
            payment_reference: format!("pay-{n}"),
        });
        commands.push(OrderCommand::ShipOrder {
            carrier: "bench".into(),
            tracking_number: format!("T-{n}"),
        });
    }
    commands
}

fn lifecycle_batch(first_order: u64, customers: &[Uuid]) -> anyhow::Result<Vec<AppendRequest>> {
    (first_order..first_order + ORDERS_PER_BATCH as u64)
        .map(|n| {
            let customer = customers[(n as usize) % customers.len()];
            let order_id = Uuid::now_v7();
            decided(order_id, &lifecycle_commands(n, order_id, customer))
                .map(|(request, _)| request)
        })
        .collect()
}

/// Appends complete order lifecycles until the store holds at least `target_events` events.
pub async fn fill_lifecycles(pool: &PgPool, target_events: u64) -> anyhow::Result<Generated> {
    let started = Instant::now();
    let head = store::head_position(pool).await.context("read the head")?;
    let needed = target_events.saturating_sub(head as u64);
    // 5.8 events per order on average (4-7, one in five cancelled); any shortfall is topped up
    // below, one batch at a time.
    let batches = (needed * 10 / 58) / ORDERS_PER_BATCH as u64;
    let customers: Vec<Uuid> = (0..1_000).map(|_| Uuid::new_v4()).collect();
    let customers = &customers;
    let written: Vec<u64> = futures::stream::iter(0..batches)
        .map(|batch| async move {
            let requests = lifecycle_batch(batch * ORDERS_PER_BATCH as u64, customers)?;
            let events: u64 = requests.iter().map(|r| r.events.len() as u64).sum();
            append_all(pool, &requests).await?;
            anyhow::Ok(events)
        })
        .buffer_unordered(BATCHES_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut events: u64 = written.iter().sum();
    let mut orders = batches * ORDERS_PER_BATCH as u64;
    // Top up if the average came out short.
    let mut n = orders;
    while (head as u64) + events < target_events {
        let requests = lifecycle_batch(n, customers)?;
        events += requests.iter().map(|r| r.events.len() as u64).sum::<u64>();
        append_all(pool, &requests).await?;
        n += ORDERS_PER_BATCH as u64;
        orders += ORDERS_PER_BATCH as u64;
    }
    Ok(Generated {
        events,
        orders,
        elapsed: started.elapsed(),
    })
}

async fn append_all(pool: &PgPool, requests: &[AppendRequest]) -> anyhow::Result<()> {
    let results = store::append_batch(pool, requests)
        .await
        .context("append a generated batch")?;
    if let Some(err) = results.into_iter().find_map(Result::err) {
        anyhow::bail!("a generated append was refused: {err}");
    }
    Ok(())
}

/// An order generated directly in the store, with what the next valid command on it is.
#[derive(Debug, Clone)]
pub struct SeededOrder {
    pub order_id: Uuid,
    /// The order's state after its last event (for snapshots).
    pub state: OrderState,
    /// The state at the last multiple of the snapshot interval, if asked for.
    pub snapshot: Option<OrderState>,
}

/// The SKU toggled on long orders: added and removed alternately, so the order stays in draft
/// with at most one line however long it grows.
pub const TOGGLED_SKU: &str = "LONG-1";

/// Writes one draft order of exactly `events` events: created, then [`TOGGLED_SKU`] added and
/// removed alternately. Keeps the state at the last multiple of `snapshot_every` (if > 0).
pub async fn seed_long_order(
    pool: &PgPool,
    events: i64,
    snapshot_every: i64,
) -> anyhow::Result<SeededOrder> {
    let order_id = Uuid::now_v7();
    let stream_id = order_stream_id(order_id);
    let metadata = metadata();
    let mut state = OrderState::default();
    let mut snapshot = None;
    let mut pending = Vec::with_capacity(LONG_STREAM_BATCH);
    let mut expected = 0;
    for version in 1..=events.max(1) {
        let command = if version == 1 {
            OrderCommand::CreateOrder {
                order_id,
                customer_id: Uuid::new_v4(),
                currency: "EUR".into(),
            }
        } else {
            toggle_command(&state)
        };
        let decided = decide(&state, &command)
            .map_err(|e| anyhow::anyhow!("long-order command {} refused: {e}", command.name()))?;
        for event in decided {
            pending.push(event.to_new_event(metadata.clone()));
            state = evolve(state, &event);
        }
        if snapshot_every > 0 && state.version % snapshot_every == 0 {
            snapshot = Some(state.clone());
        }
        if pending.len() >= LONG_STREAM_BATCH || version == events.max(1) {
            let request = AppendRequest {
                stream_id: stream_id.clone(),
                expected: ExpectedVersion::Exact(expected),
                events: std::mem::take(&mut pending),
                idempotency: None,
            };
            expected += request.events.len() as i64;
            append_all(pool, std::slice::from_ref(&request)).await?;
        }
    }
    Ok(SeededOrder {
        order_id,
        state,
        snapshot,
    })
}

/// The command that toggles [`TOGGLED_SKU`] on a draft order.
pub fn toggle_command(state: &OrderState) -> OrderCommand {
    let present = state.order.as_ref().is_some_and(|order| {
        order
            .items
            .iter()
            .any(|line| line.sku.as_str() == TOGGLED_SKU)
    });
    if present {
        OrderCommand::RemoveItem {
            sku: TOGGLED_SKU.into(),
        }
    } else {
        OrderCommand::AddItem {
            sku: TOGGLED_SKU.into(),
            quantity: 1,
            unit_price: 100,
        }
    }
}

/// Stores the snapshot the command service would have taken of a seeded order.
pub async fn save_seed_snapshot(pool: &PgPool, order: &SeededOrder) -> anyhow::Result<()> {
    if let Some(snapshot) = &order.snapshot {
        store::save_snapshot(
            pool,
            &order_stream_id(order.order_id),
            snapshot.version,
            events::STATE_SCHEMA_VERSION,
            snapshot,
        )
        .await
        .context("save a snapshot of a long order")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_generated_lifecycle_is_accepted_by_the_aggregate() {
        for n in 0..10 {
            let order_id = Uuid::now_v7();
            let (request, state) =
                decided(order_id, &lifecycle_commands(n, order_id, Uuid::new_v4()))
                    .unwrap_or_else(|e| panic!("lifecycle {n}: {e}"));
            assert!((4..=7).contains(&request.events.len()));
            let status = state.order.map(|o| o.status);
            assert!(matches!(
                status,
                Some(events::OrderStatus::Shipped | events::OrderStatus::Cancelled)
            ));
        }
    }
}
