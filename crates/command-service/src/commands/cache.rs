//! The per-order slots: one async mutex per order id, guarding the order's cached state.
//!
//! Holding an order's slot is what serialises the commands of one order inside this instance.
//! The map is bounded twice: in orders, and in the bytes their states take, since one order may
//! hold 200 lines of 64-character SKUs (about 30 kB), and ten thousand of those would not fit
//! a container's memory. When either bound is reached, entries nobody holds are dropped (their
//! orders simply reload from the store next time). It never evicts a slot in use, since two
//! holders of two different mutexes for one order would no longer be serialised.

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use events::{LineItem, OrderState};
use uuid::Uuid;

/// Gauge of the bytes the cached order states take, as [`OrderSlots`] reckons them.
pub const CACHE_BYTES_GAUGE: &str = "command_order_cache_bytes";

/// What an entry of the map costs beyond its state's own heap: the key, the slot's `Arc` and
/// mutex around the state, the recorded weight, and the hash table's own share (its control
/// bytes and spare capacity), rounded up.
const ENTRY_OVERHEAD: usize = 64
    + size_of::<Uuid>()
    + size_of::<usize>()
    + size_of::<OrderSlot>()
    + size_of::<tokio::sync::Mutex<Option<CachedOrder>>>();

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

/// Bytes `order` takes in the cache, roughly: its map entry and the heap its state holds (the
/// lines' vector, each SKU's text, the currency's). An estimate, but one that grows as the
/// memory does, which is what a bound needs.
pub fn weight(order: &CachedOrder) -> usize {
    let state = order.state.order.as_ref().map_or(0, |o| {
        o.items.capacity() * size_of::<LineItem>()
            + o.items.iter().map(|l| l.sku.as_str().len()).sum::<usize>()
            + o.currency.as_str().len()
    });
    ENTRY_OVERHEAD + state
}

/// A kept slot, with the weight of the state it held when last recorded.
#[derive(Debug)]
struct Kept {
    slot: OrderSlot,
    weight: usize,
}

/// The map and the sum of its recorded weights, under one lock.
#[derive(Debug, Default)]
struct Map {
    slots: HashMap<Uuid, Kept>,
    bytes: usize,
}

impl Map {
    /// Drops slots nobody holds until at most `max_slots` and `max_bytes` are kept. Called once
    /// a bound is reached, with three quarters of it, so that eviction (a scan of the map) runs
    /// once per many inserts rather than on every one.
    fn evict_unheld(&mut self, max_slots: usize, max_bytes: usize) {
        let mut slots = self.slots.len();
        let mut bytes = self.bytes;
        self.slots.retain(|_, kept| {
            let over = slots > max_slots || bytes > max_bytes;
            if over && Arc::strong_count(&kept.slot) == 1 {
                slots -= 1;
                bytes -= kept.weight;
                false
            } else {
                true
            }
        });
        self.bytes = bytes;
    }
}

/// Bounded map of order id → slot.
#[derive(Debug)]
pub struct OrderSlots {
    capacity: usize,
    max_bytes: usize,
    map: Mutex<Map>,
    /// [`CACHE_BYTES_GAUGE`], looked up once rather than per command.
    bytes_gauge: metrics::Gauge,
}

impl OrderSlots {
    /// A map holding at most `capacity` slots (at least 1) whose states take at most
    /// `max_bytes`, as [`weight`] reckons them.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            max_bytes,
            map: Mutex::new(Map::default()),
            bytes_gauge: metrics::gauge!(CACHE_BYTES_GAUGE),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Map> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still a
        // valid map, so keep using it.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of `order_id`, created (empty) when absent.
    pub fn slot(&self, order_id: Uuid) -> OrderSlot {
        let mut map = self.map();
        if let Some(kept) = map.slots.get(&order_id) {
            return kept.slot.clone();
        }
        if map.slots.len() >= self.capacity {
            map.evict_unheld(self.capacity - self.capacity / 4 - 1, self.max_bytes);
            self.bytes_gauge.set(map.bytes as f64);
        }
        let slot = OrderSlot::default();
        if map.slots.len() < self.capacity {
            map.slots.insert(
                order_id,
                Kept {
                    slot: slot.clone(),
                    weight: ENTRY_OVERHEAD,
                },
            );
            map.bytes += ENTRY_OVERHEAD;
        }
        // Every slot is in use: hand out an unshared one. This order's commands are then not
        // serialised in memory, which the store's version check still keeps correct.
        slot
    }

    /// Records what the state just put in `slot`, `order_id`'s, weighs (the caller holds the
    /// slot), and drops slots nobody holds when the states take more than the bound. A state
    /// cleared afterwards keeps its weight until the next record or its eviction: the bound
    /// errs on the side of memory.
    pub fn record(&self, order_id: Uuid, slot: &OrderSlot, order: &CachedOrder) {
        let weight = weight(order);
        let mut map = self.map();
        let Some(kept) = map
            .slots
            .get_mut(&order_id)
            .filter(|kept| Arc::ptr_eq(&kept.slot, slot))
        else {
            // An unshared slot, handed out while every kept one was in use, is not kept (and
            // one kept for the order since then holds another state).
            return;
        };
        if kept.weight == weight {
            // Placing, paying, shipping and cancelling leave the lines as they were.
            return;
        }
        let before = std::mem::replace(&mut kept.weight, weight);
        map.bytes = map.bytes - before + weight;
        if map.bytes > self.max_bytes {
            map.evict_unheld(self.capacity, self.max_bytes - self.max_bytes / 4);
        }
        let bytes = map.bytes;
        drop(map);
        self.bytes_gauge.set(bytes as f64);
    }

    /// Number of slots currently kept.
    pub fn len(&self) -> usize {
        self.map().slots.len()
    }

    /// Whether no slot is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the kept states take, as [`weight`] reckons them.
    pub fn bytes(&self) -> usize {
        self.map().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use events::money::{Currency, MAX_LINES, MAX_SKU_LEN, Sku};
    use events::{Order, OrderStatus};

    /// An order of `lines` lines, each with a SKU of the longest length.
    fn order_of(lines: usize) -> CachedOrder {
        let items = (0..lines)
            .map(|i| LineItem {
                sku: Sku::parse(&format!("{i:0>width$}", width = MAX_SKU_LEN)).expect("a SKU"),
                quantity: 1,
                unit_price: 1,
            })
            .collect();
        CachedOrder {
            state: OrderState {
                order: Some(Order {
                    order_id: Uuid::new_v4(),
                    customer_id: Uuid::new_v4(),
                    currency: Currency::parse("EUR").expect("EUR"),
                    status: OrderStatus::Draft,
                    items,
                }),
                version: 1 + lines as i64,
            },
            last_event_id: Some(Uuid::new_v4()),
        }
    }

    #[test]
    fn the_same_order_gets_the_same_slot() {
        let slots = OrderSlots::new(4, usize::MAX);
        let id = Uuid::new_v4();
        assert!(Arc::ptr_eq(&slots.slot(id), &slots.slot(id)));
    }

    #[test]
    fn a_full_map_drops_only_slots_nobody_holds() {
        let slots = OrderSlots::new(4, usize::MAX);
        let held: Vec<OrderSlot> = (0..2).map(|_| slots.slot(Uuid::new_v4())).collect();
        for _ in 0..20 {
            let _ = slots.slot(Uuid::new_v4());
        }
        assert!(slots.len() <= 4);
        let map = slots.map();
        for slot in &held {
            assert!(map.slots.values().any(|kept| Arc::ptr_eq(&kept.slot, slot)));
        }
    }

    #[test]
    fn an_unshared_slot_records_no_weight_for_the_slot_kept_since() {
        let slots = OrderSlots::new(1, usize::MAX);
        let busy = slots.slot(Uuid::new_v4());
        let id = Uuid::new_v4();
        let unshared = slots.slot(id);
        drop(busy);
        let kept = slots.slot(id);
        assert!(!Arc::ptr_eq(&kept, &unshared));
        let before = slots.bytes();
        slots.record(id, &unshared, &order_of(MAX_LINES));
        assert_eq!(slots.bytes(), before);
        slots.record(id, &kept, &order_of(MAX_LINES));
        assert!(slots.bytes() > before);
    }

    #[test]
    fn a_largest_order_weighs_what_its_lines_take() {
        let largest = weight(&order_of(MAX_LINES));
        // 200 lines of 64-byte SKUs: at least the SKUs and the lines' vector.
        assert!(
            largest >= MAX_LINES * (MAX_SKU_LEN + size_of::<LineItem>()),
            "{largest}"
        );
        assert!(largest > 50 * weight(&order_of(1)), "{largest}");
    }

    #[test]
    fn large_orders_are_dropped_to_keep_the_states_within_their_bytes() {
        let max_bytes = 10 * weight(&order_of(MAX_LINES));
        let slots = OrderSlots::new(10_000, max_bytes);
        let held_id = Uuid::new_v4();
        let held = slots.slot(held_id);
        slots.record(held_id, &held, &order_of(MAX_LINES));
        for _ in 0..100 {
            let id = Uuid::new_v4();
            let slot = slots.slot(id);
            slots.record(id, &slot, &order_of(MAX_LINES));
            drop(slot);
            assert!(
                slots.bytes() <= max_bytes,
                "{} > {max_bytes}",
                slots.bytes()
            );
        }
        assert!(slots.len() <= 10, "{} slots kept", slots.len());
        let map = slots.map();
        assert!(
            Arc::ptr_eq(&map.slots[&held_id].slot, &held),
            "a held slot was dropped"
        );
        let recorded: usize = map.slots.values().map(|kept| kept.weight).sum();
        assert_eq!(map.bytes, recorded);
    }
}
