//! W3C Trace Context `traceparent` header: parsing, validation and generation.
//!
//! Only version `00` is accepted: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, all
//! lowercase, ids not all zero. Anything else is treated as absent, and a fresh context is
//! generated so every command still carries one.

use std::fmt;

/// A valid `traceparent` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: String,
    parent_id: String,
    flags: u8,
}

impl TraceParent {
    /// A fresh, sampled trace context with random ids.
    pub fn generate() -> Self {
        // A v4 uuid holds 122 random bits and is never all zero, which is all the spec asks.
        let trace_id = uuid::Uuid::new_v4().simple().to_string();
        let parent_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        Self {
            trace_id,
            parent_id,
            flags: 0x01,
        }
    }

    /// The 32 lowercase hex digits of the trace id.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// The 16 lowercase hex digits of the parent (span) id.
    pub fn parent_id(&self) -> &str {
        &self.parent_id
    }

    /// The trace flags byte.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the caller sampled this trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 == 0x01
    }
}

impl fmt::Display for TraceParent {
    /// The header value, `00-<trace id>-<parent id>-<flags>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// Parses a `traceparent` header value; `None` unless it is a valid version-00 value.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let mut parts = value.trim().split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" {
        return None;
    }
    let valid_id = |id: &str, len: usize| {
        id.len() == len && id.bytes().all(is_lower_hex) && id.bytes().any(|b| b != b'0')
    };
    if !valid_id(trace_id, 32) || !valid_id(parent_id, 16) {
        return None;
    }
    if flags.len() != 2 || !flags.bytes().all(is_lower_hex) {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceParent {
        trace_id: trace_id.to_owned(),
        parent_id: parent_id.to_owned(),
        flags,
    })
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_accepted() {
        let tp = parse_traceparent(VALID).unwrap();
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id(), "00f067aa0ba902b7");
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), VALID);
    }

    #[test]
    fn malformed_traceparents_are_rejected() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "accepted {bad:?}");
        }
    }

    #[test]
    fn a_generated_traceparent_parses_back() {
        let tp = TraceParent::generate();
        assert_eq!(parse_traceparent(&tp.to_string()), Some(tp));
    }
}
