//! The HTTP side: a client for the write API (commands) and the read API (summaries with
//! `?min_position=`), and the order lifecycle script the closed-loop clients walk through.
//! Only the contract in CONTRACT.md is used here.

use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// Per-request timeout: far above any latency worth reporting, so only a hung service trips it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections kept per host: at least the highest concurrency, so closed-loop clients
/// reuse connections instead of measuring TCP handshakes.
const POOL_IDLE_PER_HOST: usize = 256;

/// One write-API command.
#[derive(Debug, Clone)]
pub struct Command {
    pub order_id: Uuid,
    /// Path below the base URL.
    pub path: String,
    /// `None` for bodiless POSTs (place) and DELETE.
    pub body: Option<Value>,
    pub delete: bool,
}

impl Command {
    /// `POST /orders`.
    pub fn create(order_id: Uuid, customer_id: Uuid) -> Self {
        Self {
            order_id,
            path: "/orders".into(),
            body: Some(
                json!({"order_id": order_id, "customer_id": customer_id, "currency": "EUR"}),
            ),
            delete: false,
        }
    }

    /// `POST /orders/{id}/items`.
    pub fn add_item(order_id: Uuid, sku: &str, quantity: i64, unit_price: i64) -> Self {
        Self {
            order_id,
            path: format!("/orders/{order_id}/items"),
            body: Some(json!({"sku": sku, "quantity": quantity, "unit_price": unit_price})),
            delete: false,
        }
    }

    /// `DELETE /orders/{id}/items/{sku}`.
    pub fn remove_item(order_id: Uuid, sku: &str) -> Self {
        Self {
            order_id,
            path: format!("/orders/{order_id}/items/{sku}"),
            body: None,
            delete: true,
        }
    }

    /// `POST /orders/{id}/place`.
    pub fn place(order_id: Uuid) -> Self {
        Self {
            order_id,
            path: format!("/orders/{order_id}/place"),
            body: None,
            delete: false,
        }
    }

    /// `POST /orders/{id}/pay`.
    pub fn pay(order_id: Uuid, amount: i64) -> Self {
        Self {
            order_id,
            path: format!("/orders/{order_id}/pay"),
            body: Some(json!({"amount": amount, "payment_reference": format!("pay-{order_id}")})),
            delete: false,
        }
    }

    /// `POST /orders/{id}/ship`.
    pub fn ship(order_id: Uuid) -> Self {
        Self {
            order_id,
            path: format!("/orders/{order_id}/ship"),
            body: Some(json!({"carrier": "bench", "tracking_number": format!("T-{order_id}")})),
            delete: false,
        }
    }

    /// `POST /orders/{id}/cancel`.
    pub fn cancel(order_id: Uuid) -> Self {
        Self {
            order_id,
            path: format!("/orders/{order_id}/cancel"),
            body: Some(json!({"reason": "bench"})),
            delete: false,
        }
    }
}

/// The success body of a command.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Accepted {
    pub version: i64,
    pub position: i64,
}

/// What a command got back.
#[derive(Debug)]
pub enum Outcome {
    Accepted(Accepted),
    /// A non-2xx status (the body's `code`, if any).
    Refused {
        status: u16,
        code: String,
    },
    /// No HTTP answer (connection error, timeout).
    Failed(String),
}

/// A client for both APIs.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    command_url: String,
    query_url: String,
    token: Option<String>,
    /// Whose CPU time the closed-loop runs report (spawned services only).
    cpu: Option<std::sync::Arc<crate::cpu::CpuProbe>>,
}

impl Api {
    /// A client for the given base URLs.
    pub fn new(command_url: &str, query_url: &str, token: Option<String>) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .tcp_nodelay(true)
            .build()
            .context("build the HTTP client")?;
        Ok(Self {
            client,
            command_url: command_url.trim_end_matches('/').to_owned(),
            query_url: query_url.trim_end_matches('/').to_owned(),
            token,
            cpu: None,
        })
    }

    /// Makes closed-loop runs report the CPU time of what `probe` reads.
    pub fn observe_cpu(mut self, probe: crate::cpu::CpuProbe) -> Self {
        self.cpu = Some(std::sync::Arc::new(probe));
        self
    }

    /// What closed-loop runs read CPU time from, if anything.
    pub fn cpu_probe(&self) -> Option<std::sync::Arc<crate::cpu::CpuProbe>> {
        self.cpu.clone()
    }

    /// Base URL of the command service.
    pub fn command_url(&self) -> &str {
        &self.command_url
    }

    /// Base URL of the query service.
    pub fn query_url(&self) -> &str {
        &self.query_url
    }

    /// The underlying HTTP client (for `/metrics`).
    pub fn http(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends one command.
    pub async fn send(&self, command: &Command) -> Outcome {
        let url = format!("{}{}", self.command_url, command.path);
        let mut request = if command.delete {
            self.client.delete(url)
        } else {
            self.client.post(url)
        };
        if let Some(body) = &command.body {
            request = request.json(body);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => return Outcome::Failed(err.to_string()),
        };
        let status = response.status();
        let body: Value = match response.json().await {
            Ok(body) => body,
            Err(err) => return Outcome::Failed(format!("unreadable body ({status}): {err}")),
        };
        if status.is_success() {
            match serde_json::from_value::<Accepted>(body) {
                Ok(accepted) => Outcome::Accepted(accepted),
                Err(err) => Outcome::Failed(format!("unexpected success body: {err}")),
            }
        } else {
            Outcome::Refused {
                status: status.as_u16(),
                code: body
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            }
        }
    }

    /// `GET /orders/{id}?min_position=N`: the HTTP status (200 once the read model has applied
    /// position N and holds the order).
    pub async fn read_at_least(&self, order_id: Uuid, position: i64) -> Result<u16, String> {
        let mut request = self
            .client
            .get(format!("{}/orders/{order_id}", self.query_url))
            .query(&[("min_position", position)]);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                // Drain the body so the connection goes back to the pool.
                let _ = response.bytes().await;
                Ok(status)
            }
            Err(err) => Err(err.to_string()),
        }
    }
}

/// Unit price of every item the workload adds (minor units).
pub const UNIT_PRICE: i64 = 250;

/// One order's walk through the lifecycle: create, 1-3 items, place, pay the total, then ship
/// (four orders in five) or cancel. Every step is valid, so a refusal is a real failure.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    order_id: Uuid,
    customer_id: Uuid,
    items: usize,
    cancel: bool,
    step: usize,
}

impl Lifecycle {
    /// The lifecycle of the `n`-th order a client creates.
    pub fn new(n: u64, customer_id: Uuid) -> Self {
        Self {
            order_id: Uuid::now_v7(),
            customer_id,
            items: 1 + (n % 3) as usize,
            cancel: n % 5 == 4,
            step: 0,
        }
    }

    /// The order's id.
    pub fn order_id(&self) -> Uuid {
        self.order_id
    }

    /// The next command, or `None` when the order is finished.
    pub fn next_command(&mut self) -> Option<Command> {
        let id = self.order_id;
        let step = self.step;
        self.step += 1;
        let items = self.items;
        match step {
            0 => Some(Command::create(id, self.customer_id)),
            s if s <= items => Some(Command::add_item(
                id,
                &format!("SKU-{s}"),
                s as i64,
                UNIT_PRICE,
            )),
            s if s == items + 1 => Some(Command::place(id)),
            s if s == items + 2 => {
                let total: i64 = (1..=items as i64).map(|q| q * UNIT_PRICE).sum();
                Some(Command::pay(id, total))
            }
            s if s == items + 3 => Some(if self.cancel {
                Command::cancel(id)
            } else {
                Command::ship(id)
            }),
            _ => None,
        }
    }
}

/// An endless stream of lifecycle commands for one client: a new order when one finishes.
#[derive(Debug)]
pub struct Workload {
    customer_id: Uuid,
    orders: u64,
    current: Lifecycle,
}

impl Workload {
    /// A workload for one client (one customer).
    pub fn new() -> Self {
        let customer_id = Uuid::new_v4();
        Self {
            customer_id,
            orders: 1,
            current: Lifecycle::new(0, customer_id),
        }
    }

    /// The next command.
    pub fn next_command(&mut self) -> Command {
        loop {
            if let Some(command) = self.current.next_command() {
                return command;
            }
            self.current = Lifecycle::new(self.orders, self.customer_id);
            self.orders += 1;
        }
    }
}

impl Workload {
    /// Gives up on the current order (after a refused command its lifecycle is off track).
    pub fn abandon(&mut self) {
        self.current = Lifecycle::new(self.orders, self.customer_id);
        self.orders += 1;
    }
}

impl Default for Workload {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifecycle_ends_shipped_or_cancelled_after_paying_the_total() {
        let mut lifecycle = Lifecycle::new(1, Uuid::new_v4());
        let paths: Vec<String> = std::iter::from_fn(|| lifecycle.next_command())
            .map(|c| c.path)
            .collect();
        assert_eq!(paths.len(), 6, "{paths:?}");
        assert!(paths[0].ends_with("/orders"));
        assert!(paths[3].ends_with("/place"));
        assert!(paths[4].ends_with("/pay"));
        assert!(paths[5].ends_with("/ship"));
        let mut cancelled = Lifecycle::new(4, Uuid::new_v4());
        let last = std::iter::from_fn(|| cancelled.next_command())
            .last()
            .map(|c| c.path);
        assert!(last.is_some_and(|p| p.ends_with("/cancel")));
    }

    #[test]
    fn the_workload_moves_on_to_a_new_order_when_one_finishes() {
        let mut workload = Workload::new();
        let first = workload.next_command().order_id;
        let ids: std::collections::HashSet<Uuid> =
            (0..20).map(|_| workload.next_command().order_id).collect();
        assert!(ids.len() > 1);
        assert!(ids.contains(&first));
    }
}
