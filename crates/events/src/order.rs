//! The Order aggregate as a pure `decide`/`evolve` pair.
//!
//! `decide(&state, &command)` either rejects a command with a [`DomainError`] naming the rule, or
//! returns the events it produces; `evolve(state, &event)` folds one event into the state. Neither
//! does I/O, so the write side, the projectors and the query service's time travel all share them.
//!
//! Lifecycle: draft → placed (needs an item) → paid (amount equals the total) → shipped.
//! Items change only in draft; cancel is allowed before shipping; nothing follows cancel.

use crate::money::{Currency, MAX_AMOUNT, MAX_LINES, MAX_QUANTITY, MAX_TEXT_LEN, Sku, quoted};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Draft,
    Placed,
    Paid,
    Shipped,
    Cancelled,
}

impl OrderStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [OrderStatus; 5] = [
        OrderStatus::Draft,
        OrderStatus::Placed,
        OrderStatus::Paid,
        OrderStatus::Shipped,
        OrderStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Draft => "draft",
            OrderStatus::Placed => "placed",
            OrderStatus::Paid => "paid",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == value)
    }

    /// Whether the order's total counts as money spent by its customer.
    pub fn is_paid_for(self) -> bool {
        matches!(self, OrderStatus::Paid | OrderStatus::Shipped)
    }
}

/// One line of an order. Adding a SKU that is already present merges the quantities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LineItem {
    #[schema(value_type = String)]
    pub sku: Sku,
    pub quantity: i64,
    /// Price of one unit in minor units of the order's currency.
    pub unit_price: i64,
}

/// What can be asked of an order. Values are raw here; `decide` enforces every rule so the
/// rules live in one place and each rejection names its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    CreateOrder {
        order_id: Uuid,
        customer_id: Uuid,
        currency: String,
    },
    AddItem {
        sku: String,
        quantity: i64,
        unit_price: i64,
    },
    RemoveItem {
        sku: String,
    },
    PlaceOrder,
    PayOrder {
        amount: i64,
        payment_reference: String,
    },
    ShipOrder {
        carrier: String,
        tracking_number: String,
    },
    CancelOrder {
        reason: String,
    },
}

impl OrderCommand {
    /// The command's name, for logs, metrics and metadata.
    pub fn name(&self) -> &'static str {
        match self {
            OrderCommand::CreateOrder { .. } => "CreateOrder",
            OrderCommand::AddItem { .. } => "AddItem",
            OrderCommand::RemoveItem { .. } => "RemoveItem",
            OrderCommand::PlaceOrder => "PlaceOrder",
            OrderCommand::PayOrder { .. } => "PayOrder",
            OrderCommand::ShipOrder { .. } => "ShipOrder",
            OrderCommand::CancelOrder { .. } => "CancelOrder",
        }
    }
}

/// What happened to an order. Names are past tense; payloads are what a reader needs without
/// looking anything up. Stored as JSON with `event_type` = the variant name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    OrderCreated(OrderCreated),
    ItemAdded(ItemAdded),
    ItemRemoved(ItemRemoved),
    OrderPlaced(OrderPlaced),
    OrderPaid(OrderPaid),
    OrderShipped(OrderShipped),
    OrderCancelled(OrderCancelled),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemAdded {
    pub sku: Sku,
    /// Units added by this event (merged into an existing line of the same SKU).
    pub quantity: i64,
    pub unit_price: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRemoved {
    pub sku: Sku,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The total at the moment of placing, in minor units; items are frozen from here on.
    pub total: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPaid {
    pub amount: i64,
    pub payment_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderShipped {
    pub carrier: String,
    pub tracking_number: String,
}

/// Schema version 2 added `refund`; a version 1 event (written before) reads with `refund`
/// absent, see `codec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub reason: String,
    /// What the customer paid and is owed back, in minor units: the total of a paid order,
    /// 0 for one not paid yet. `None` only for events written before schema version 2, which
    /// did not record it (a reader that needs it folds the order's earlier events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<i64>,
}

/// A created order's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub currency: Currency,
    pub status: OrderStatus,
    /// Lines in the order they were first added.
    pub items: Vec<LineItem>,
}

impl Order {
    /// Sum of `quantity * unit_price`, or `None` on `i64` overflow.
    pub fn total(&self) -> Option<i64> {
        self.items.iter().try_fold(0i64, |sum, line| {
            line.quantity
                .checked_mul(line.unit_price)
                .and_then(|line_total| sum.checked_add(line_total))
        })
    }
}

/// The state `decide` works on: the order (absent before `OrderCreated`) and the stream version
/// it reflects. Serialised into snapshots under [`STATE_SCHEMA_VERSION`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    pub order: Option<Order>,
    pub version: i64,
}

/// Version of the [`OrderState`] layout in snapshots. Bump it whenever `OrderState` or anything
/// inside it changes shape or meaning: snapshots of another version are ignored, never mis-read.
pub const STATE_SCHEMA_VERSION: i32 = 1;

/// The rule a rejected command broke; `code()` is the stable string clients branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    InvalidCurrency,
    InvalidSku,
    QuantityNotPositive,
    QuantityTooLarge,
    PriceNegative,
    TooManyLines,
    TotalOverflow,
    PriceMismatch,
    ItemNotInOrder,
    ItemsOnlyInDraft,
    PlaceNeedsItems,
    NotDraft,
    NotPlaced,
    AmountMismatch,
    NotPaid,
    AlreadyShipped,
    AlreadyCancelled,
    TextRequired,
    TextTooLong,
    TextControlCharacter,
}

impl Rule {
    pub fn code(self) -> &'static str {
        match self {
            Rule::InvalidCurrency => "invalid_currency",
            Rule::InvalidSku => "invalid_sku",
            Rule::QuantityNotPositive => "quantity_not_positive",
            Rule::QuantityTooLarge => "quantity_too_large",
            Rule::PriceNegative => "price_negative",
            Rule::TooManyLines => "too_many_lines",
            Rule::TotalOverflow => "total_overflow",
            Rule::PriceMismatch => "price_mismatch",
            Rule::ItemNotInOrder => "item_not_in_order",
            Rule::ItemsOnlyInDraft => "items_only_in_draft",
            Rule::PlaceNeedsItems => "place_needs_items",
            Rule::NotDraft => "not_draft",
            Rule::NotPlaced => "not_placed",
            Rule::AmountMismatch => "amount_mismatch",
            Rule::NotPaid => "not_paid",
            Rule::AlreadyShipped => "already_shipped",
            Rule::AlreadyCancelled => "already_cancelled",
            Rule::TextRequired => "text_required",
            Rule::TextTooLong => "text_too_long",
            Rule::TextControlCharacter => "text_control_character",
        }
    }
}

/// Why `decide` refused a command. Infrastructure failures never appear here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("order not found")]
    NotFound,
    #[error("an order with this id already exists")]
    AlreadyExists,
    #[error("{message}")]
    Rejected { rule: Rule, message: String },
}

fn reject<T>(rule: Rule, message: impl Into<String>) -> Result<T, DomainError> {
    Err(DomainError::Rejected {
        rule,
        message: message.into(),
    })
}

fn required_text(field: &str, value: &str) -> Result<String, DomainError> {
    // Blank as the published schema's pattern sees it (ECMAScript's `\s`): Unicode white space
    // and U+FEFF, the byte order mark, which Rust's `trim` keeps. A reason of a lone, invisible
    // BOM is no reason.
    let trimmed = value.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if trimmed.is_empty() {
        return reject(Rule::TextRequired, format!("`{field}` must not be empty"));
    }
    // Characters (Unicode scalar values), as JSON Schema's `maxLength` counts them: "é" is one.
    if trimmed.chars().nth(MAX_TEXT_LEN).is_some() {
        return reject(
            Rule::TextTooLong,
            format!("`{field}` is longer than {MAX_TEXT_LEN} characters"),
        );
    }
    // Line breaks and tabs are text; other control characters are not, and NUL (U+0000) cannot
    // be stored at all: PostgreSQL's jsonb refuses it, which would fail the whole group commit
    // the event shares with other commands.
    if let Some(c) = trimmed
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return reject(
            Rule::TextControlCharacter,
            format!(
                "`{field}` contains the control character U+{:04X}",
                u32::from(c)
            ),
        );
    }
    Ok(trimmed.to_owned())
}

fn parse_sku(sku: &str) -> Result<Sku, DomainError> {
    Sku::parse(sku).map_or_else(
        || {
            reject(
                Rule::InvalidSku,
                format!(
                    "{} is not a valid SKU (1-64 of A-Z a-z 0-9 - _ ., not `.` or `..`)",
                    quoted(sku)
                ),
            )
        },
        Ok,
    )
}

fn not_cancelled(order: &Order) -> Result<(), DomainError> {
    if order.status == OrderStatus::Cancelled {
        return reject(Rule::AlreadyCancelled, "the order is cancelled");
    }
    Ok(())
}

fn items_editable(order: &Order) -> Result<(), DomainError> {
    not_cancelled(order)?;
    if order.status != OrderStatus::Draft {
        return reject(
            Rule::ItemsOnlyInDraft,
            format!(
                "items change only in draft; the order is {}",
                order.status.as_str()
            ),
        );
    }
    Ok(())
}

/// Decides what a command does to an order: the events to append, or the rule it breaks.
pub fn decide(state: &OrderState, command: &OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
    let order = match (&state.order, command) {
        (
            None,
            OrderCommand::CreateOrder {
                order_id,
                customer_id,
                currency,
            },
        ) => {
            let Some(currency) = Currency::parse(currency) else {
                return reject(
                    Rule::InvalidCurrency,
                    format!("{} is not an ISO 4217 currency code", quoted(currency)),
                );
            };
            return Ok(vec![OrderEvent::OrderCreated(OrderCreated {
                order_id: *order_id,
                customer_id: *customer_id,
                currency,
            })]);
        }
        (Some(_), OrderCommand::CreateOrder { .. }) => return Err(DomainError::AlreadyExists),
        (None, _) => return Err(DomainError::NotFound),
        (Some(order), _) => order,
    };

    let event = match command {
        OrderCommand::CreateOrder { .. } => return Err(DomainError::AlreadyExists),
        OrderCommand::AddItem {
            sku,
            quantity,
            unit_price,
        } => {
            items_editable(order)?;
            let sku = parse_sku(sku)?;
            if sku.is_dot_segment() {
                return reject(
                    Rule::InvalidSku,
                    format!("`{sku}` is not a valid SKU: URL clients resolve it away from a path"),
                );
            }
            if *quantity <= 0 {
                return reject(Rule::QuantityNotPositive, "`quantity` must be at least 1");
            }
            if *unit_price < 0 {
                return reject(Rule::PriceNegative, "`unit_price` must not be negative");
            }
            let existing = order.items.iter().find(|line| line.sku == sku);
            let merged_quantity = match existing {
                Some(line) if line.unit_price != *unit_price => {
                    return reject(
                        Rule::PriceMismatch,
                        format!(
                            "`{sku}` is already in the order at unit price {}; remove it first to change the price",
                            line.unit_price
                        ),
                    );
                }
                Some(line) => line.quantity.saturating_add(*quantity),
                None if order.items.len() >= MAX_LINES => {
                    return reject(
                        Rule::TooManyLines,
                        format!("an order has at most {MAX_LINES} lines"),
                    );
                }
                None => *quantity,
            };
            if merged_quantity > MAX_QUANTITY {
                return reject(
                    Rule::QuantityTooLarge,
                    format!("a line holds at most {MAX_QUANTITY} units"),
                );
            }
            let event = ItemAdded {
                sku,
                quantity: *quantity,
                unit_price: *unit_price,
            };
            let after = evolve_order(order.clone(), &OrderEvent::ItemAdded(event.clone()));
            if after.total().is_none_or(|total| total > MAX_AMOUNT) {
                return reject(
                    Rule::TotalOverflow,
                    format!(
                        "the order total would exceed {MAX_AMOUNT}, the largest amount accepted"
                    ),
                );
            }
            OrderEvent::ItemAdded(event)
        }
        OrderCommand::RemoveItem { sku } => {
            items_editable(order)?;
            let sku = parse_sku(sku)?;
            if !order.items.iter().any(|line| line.sku == sku) {
                return reject(Rule::ItemNotInOrder, format!("`{sku}` is not in the order"));
            }
            OrderEvent::ItemRemoved(ItemRemoved { sku })
        }
        OrderCommand::PlaceOrder => {
            not_cancelled(order)?;
            if order.status != OrderStatus::Draft {
                return reject(
                    Rule::NotDraft,
                    format!(
                        "only a draft can be placed; the order is {}",
                        order.status.as_str()
                    ),
                );
            }
            if order.items.is_empty() {
                return reject(
                    Rule::PlaceNeedsItems,
                    "an order needs at least one item to be placed",
                );
            }
            let Some(total) = order.total() else {
                return reject(Rule::TotalOverflow, "the order total overflows");
            };
            OrderEvent::OrderPlaced(OrderPlaced { total })
        }
        OrderCommand::PayOrder {
            amount,
            payment_reference,
        } => {
            not_cancelled(order)?;
            if order.status != OrderStatus::Placed {
                return reject(
                    Rule::NotPlaced,
                    format!(
                        "only a placed order can be paid; the order is {}",
                        order.status.as_str()
                    ),
                );
            }
            let total = order.total().unwrap_or(i64::MAX);
            if *amount != total {
                return reject(
                    Rule::AmountMismatch,
                    format!("the amount must equal the order total of {total}"),
                );
            }
            OrderEvent::OrderPaid(OrderPaid {
                amount: *amount,
                payment_reference: required_text("payment_reference", payment_reference)?,
            })
        }
        OrderCommand::ShipOrder {
            carrier,
            tracking_number,
        } => {
            not_cancelled(order)?;
            if order.status == OrderStatus::Shipped {
                return reject(Rule::AlreadyShipped, "the order is already shipped");
            }
            if order.status != OrderStatus::Paid {
                return reject(
                    Rule::NotPaid,
                    format!(
                        "only a paid order can be shipped; the order is {}",
                        order.status.as_str()
                    ),
                );
            }
            OrderEvent::OrderShipped(OrderShipped {
                carrier: required_text("carrier", carrier)?,
                tracking_number: required_text("tracking_number", tracking_number)?,
            })
        }
        OrderCommand::CancelOrder { reason } => {
            not_cancelled(order)?;
            if order.status == OrderStatus::Shipped {
                return reject(Rule::AlreadyShipped, "a shipped order cannot be cancelled");
            }
            // A paid order's total was checked when it was placed and the payment matched
            // it, so it is there; 0 stands for nothing paid.
            let refund = if order.status == OrderStatus::Paid {
                order.total().unwrap_or_default()
            } else {
                0
            };
            OrderEvent::OrderCancelled(OrderCancelled {
                reason: required_text("reason", reason)?,
                refund: Some(refund),
            })
        }
    };
    Ok(vec![event])
}

fn evolve_order(mut order: Order, event: &OrderEvent) -> Order {
    match event {
        OrderEvent::OrderCreated(_) => {}
        OrderEvent::ItemAdded(added) => {
            match order.items.iter_mut().find(|line| line.sku == added.sku) {
                Some(line) => line.quantity = line.quantity.saturating_add(added.quantity),
                None => order.items.push(LineItem {
                    sku: added.sku.clone(),
                    quantity: added.quantity,
                    unit_price: added.unit_price,
                }),
            }
        }
        OrderEvent::ItemRemoved(removed) => order.items.retain(|line| line.sku != removed.sku),
        OrderEvent::OrderPlaced(_) => order.status = OrderStatus::Placed,
        OrderEvent::OrderPaid(_) => order.status = OrderStatus::Paid,
        OrderEvent::OrderShipped(_) => order.status = OrderStatus::Shipped,
        OrderEvent::OrderCancelled(_) => order.status = OrderStatus::Cancelled,
    }
    order
}

/// Folds one event into the state and advances its version by one.
pub fn evolve(state: OrderState, event: &OrderEvent) -> OrderState {
    let order = match (state.order, event) {
        (None, OrderEvent::OrderCreated(created)) => Some(Order {
            order_id: created.order_id,
            customer_id: created.customer_id,
            currency: created.currency.clone(),
            status: OrderStatus::Draft,
            items: Vec::new(),
        }),
        // An event before creation cannot come from `decide`; keeping the state absent rather
        // than inventing an order makes a corrupted stream visible instead of silently folded.
        (None, _) => None,
        (Some(order), event) => Some(evolve_order(order, event)),
    };
    OrderState {
        order,
        version: state.version + 1,
    }
}
