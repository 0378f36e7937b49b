//! Request and response bodies of the write API, as the contract spells them.
//!
//! Values are taken raw (a SKU is a string, money an integer of minor units): `decide` enforces
//! every domain rule, so a bad value is a 422 naming its rule, while a wrong JSON type is a 400.
//! The schemas declare the same bounds (patterns, lengths, ranges, the currency codes), so a
//! client can check a request before sending it. utoipa takes only literals for bounds: the API
//! tests check each declared bound against the domain's constant and against what the service
//! accepts and refuses.
//!
//! Every body is a JSON object, and a field it does not know is refused (400 `invalid_body`,
//! naming it): a misspelt optional field (`orderId` for `order_id`) would otherwise be dropped
//! in silence, and a retry of a create meant to be safe would create a second order.

use events::OrderCommand;
use events::money::Currency;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// `POST /orders`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    pub customer_id: Uuid,
    /// An active ISO 4217 code, upper case (`EUR`).
    #[schema(schema_with = currency_schema)]
    pub currency: String,
    /// Chosen by the client to make creation retry-safe; generated when absent.
    #[serde(default)]
    pub order_id: Option<Uuid>,
}

/// `POST /orders/{id}/items`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddItemRequest {
    /// 1-64 of `A-Z a-z 0-9 - _ .`, but not `.` or `..` (path segments URL clients resolve
    /// away, so the line could not be removed)
    #[schema(
        example = "BOOK-42",
        pattern = r"^(?:[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*|\.{3,})$",
        min_length = 1,
        max_length = 64
    )]
    pub sku: String,
    /// 1 to 10000 units; adding a SKU already in the order adds to its quantity.
    #[schema(example = 2, minimum = 1, maximum = 10000)]
    pub quantity: i64,
    /// Price of one unit in minor units (cents). The order total may not exceed
    /// 9007199254740991 (2^53 - 1, the largest integer every JSON reader holds exactly).
    #[schema(example = 1250, minimum = 0, maximum = 9_007_199_254_740_991_i64)]
    pub unit_price: i64,
}

/// What the free-text fields accept, as a JSON Schema pattern: at least one character that is
/// neither blank nor a control character, and no control character but tab, line feed and
/// carriage return (`events::Rule::TextControlCharacter` otherwise). The schema attributes
/// below repeat it (they take only literals); a test holds them to this constant.
pub const FREE_TEXT_PATTERN: &str = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*$";

/// `POST /orders/{id}/pay`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayOrderRequest {
    /// Must equal the order total, in minor units.
    #[schema(example = 2500, minimum = 0, maximum = 9_007_199_254_740_991_i64)]
    pub amount: i64,
    /// Free text: not blank, at most 500 characters once trimmed, no control characters but line breaks and tabs.
    #[schema(
        example = "psp-8f2c",
        pattern = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*$",
        max_length = 500
    )]
    pub payment_reference: String,
}

/// `POST /orders/{id}/ship`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShipOrderRequest {
    /// Free text: not blank, at most 500 characters once trimmed, no control characters but line breaks and tabs.
    #[schema(
        example = "DHL",
        pattern = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*$",
        max_length = 500
    )]
    pub carrier: String,
    /// Free text: not blank, at most 500 characters once trimmed, no control characters but line breaks and tabs.
    #[schema(
        example = "JJD000390007",
        pattern = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*$",
        max_length = 500
    )]
    pub tracking_number: String,
}

/// `POST /orders/{id}/cancel`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelOrderRequest {
    /// Free text: not blank, at most 500 characters once trimmed, no control characters but line breaks and tabs.
    #[schema(
        example = "customer changed their mind",
        pattern = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*$",
        max_length = 500
    )]
    pub reason: String,
}

/// `POST /orders/{id}/place`: no body is needed; an empty JSON object is accepted.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {}

/// Every successful command's answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandResponse {
    pub order_id: Uuid,
    /// The order's version after the command (also in `ETag`).
    pub version: i64,
    /// Global position of the command's last event; pass it as `min_position` to the read API
    /// to read your own write.
    pub position: i64,
}

/// `currency`: a string from the codes [`Currency::parse`] accepts, listed as an `enum`.
fn currency_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .description(Some("An active ISO 4217 code, upper case (`EUR`)."))
        .enum_values(Some(Currency::codes()))
        .examples(["EUR"])
        .build()
}

impl CreateOrderRequest {
    /// The command, with the order id it will create.
    pub fn into_command(self) -> (Uuid, OrderCommand) {
        let order_id = self.order_id.unwrap_or_else(Uuid::now_v7);
        (
            order_id,
            OrderCommand::CreateOrder {
                order_id,
                customer_id: self.customer_id,
                currency: self.currency,
            },
        )
    }
}

impl From<AddItemRequest> for OrderCommand {
    fn from(body: AddItemRequest) -> Self {
        OrderCommand::AddItem {
            sku: body.sku,
            quantity: body.quantity,
            unit_price: body.unit_price,
        }
    }
}

impl From<PayOrderRequest> for OrderCommand {
    fn from(body: PayOrderRequest) -> Self {
        OrderCommand::PayOrder {
            amount: body.amount,
            payment_reference: body.payment_reference,
        }
    }
}

impl From<ShipOrderRequest> for OrderCommand {
    fn from(body: ShipOrderRequest) -> Self {
        OrderCommand::ShipOrder {
            carrier: body.carrier,
            tracking_number: body.tracking_number,
        }
    }
}

impl From<CancelOrderRequest> for OrderCommand {
    fn from(body: CancelOrderRequest) -> Self {
        OrderCommand::CancelOrder {
            reason: body.reason,
        }
    }
}
