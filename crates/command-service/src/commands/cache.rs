//! The per-order slots: one async mutex per order id, guarding the order's cached state.
//!
//! Holding an order's slot is what serialises the commands of one order inside this instance.
//! The map is bounded: when it is full, entries nobody holds are dropped (their orders simply
//! reload from the store next time). It never evicts a slot in use, since two holders of two
//! different mutexes for one order would no longer be serialised.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use events::OrderState;
use uuid::Uuid;

/// An order's state as this instance last decided it: committed, or optimistically advanced by
/// appends that are submitted but not yet committed.
#[derive(Debug, Clone)]
pub struct CachedOrder {
    pub state: OrderState,
    /// The id of the event at `state.version` (`None` for an order with no events): the next
    /// append expects the stream to end with it, so it never lands on another state of the same
    /// version (`store::ExpectedVersion::Head`).
    pub last_event_id: Option<Uuid>,
}

impl CachedOrder {
    /// What an append decided on this state expects of the stream.
    pub fn expected(&self) -> store::ExpectedVersion {
        match self.last_event_id {
            Some(last_event_id) if self.state.version > 0 => store::ExpectedVersion::Head {
                version: self.state.version,
                last_event_id,
            },
            _ => store::ExpectedVersion::Exact(self.state.version),
        }
    }
}

/// One order's slot: `None` means "load from the store".
pub type OrderSlot = Arc<tokio::sync::Mutex<Option<CachedOrder>>>;

/// Bounded map of order id → slot.
#[derive(Debug)]
pub struct OrderSlots {
    capacity: usize,
    slots: Mutex<HashMap<Uuid, OrderSlot>>,
}

impl OrderSlots {
    /// A map holding at most `capacity` slots (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The slot of `order_id`, created (empty) when absent.
    pub fn slot(&self, order_id: Uuid) -> OrderSlot {
        // A poisoned lock only means another thread panicked mid-insert; the map is still a
        // valid map, so keep using it.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(&order_id) {
            return slot.clone();
        }
        if slots.len() >= self.capacity {
            evict_unheld(&mut slots, self.capacity);
        }
        let slot = OrderSlot::default();
        if slots.len() < self.capacity {
            slots.insert(order_id, slot.clone());
        }
        // Every slot is in use: hand out an unshared one. This order's commands are then not
        // serialised in memory, which the store's version check still keeps correct.
        slot
    }

    /// Number of slots currently kept.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no slot is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops slots nobody holds until a quarter of the capacity is free, so that eviction (a scan of
/// the map) runs once per many inserts rather than on every one.
fn evict_unheld(slots: &mut HashMap<Uuid, OrderSlot>, capacity: usize) {
    let target = capacity - capacity / 4 - 1;
    let mut excess = slots.len().saturating_sub(target);
    slots.retain(|_, slot| {
        if excess > 0 && Arc::strong_count(slot) == 1 {
            excess -= 1;
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_order_gets_the_same_slot() {
        let slots = OrderSlots::new(4);
        let id = Uuid::new_v4();
        assert!(Arc::ptr_eq(&slots.slot(id), &slots.slot(id)));
    }

    #[test]
    fn a_full_map_drops_only_slots_nobody_holds() {
        let slots = OrderSlots::new(4);
        let held: Vec<OrderSlot> = (0..2).map(|_| slots.slot(Uuid::new_v4())).collect();
        for _ in 0..20 {
            let _ = slots.slot(Uuid::new_v4());
        }
        assert!(slots.len() <= 4);
        let kept = slots.slots.lock().unwrap_or_else(|e| e.into_inner());
        for slot in &held {
            assert!(kept.values().any(|s| Arc::ptr_eq(s, slot)));
        }
    }
}
