//! The opaque keyset cursor of `GET /orders`.
//!
//! A cursor is base64url (no padding) of `v1:<created_position>:<check>`, where `check` is the
//! first 8 hex digits of SHA-256 over the version, the position and the page's filters. Clients
//! must treat it as opaque; the check makes a mangled cursor, or one reused with other filters,
//! a 400 `invalid_cursor` instead of a silently wrong page. It is not a secret signature: it
//! guards against mistakes, not against a determined client, who could only page its own way
//! through data it may read anyway.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Prefix naming the cursor format, so a future format can be told apart.
pub const CURSOR_VERSION: &str = "v1";
/// Longest cursor accepted, in bytes; far above a real one (about 40), so garbage is refused
/// before it is decoded.
pub const MAX_CURSOR_LEN: usize = 128;

/// The filters a cursor is bound to (rendered into its check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorScope<'a> {
    pub customer_id: Option<uuid::Uuid>,
    pub status: Option<&'a str>,
}

fn check(position: i64, scope: CursorScope<'_>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(CURSOR_VERSION.as_bytes());
    hasher.update(position.to_be_bytes());
    hasher.update(
        scope
            .customer_id
            .map(|c| c.to_string())
            .unwrap_or_default()
            .as_bytes(),
    );
    hasher.update(b"|");
    hasher.update(scope.status.unwrap_or_default().as_bytes());
    let digest = hasher.finalize();
    hex::encode(&digest[..4])
}

/// The cursor continuing after the order created at `position`.
pub fn encode(position: i64, scope: CursorScope<'_>) -> String {
    let raw = format!("{CURSOR_VERSION}:{position}:{}", check(position, scope));
    URL_SAFE_NO_PAD.encode(raw)
}

/// The `created_position` a cursor continues after, or `None` when it is not one of ours.
pub fn decode(cursor: &str, scope: CursorScope<'_>) -> Option<i64> {
    if cursor.len() > MAX_CURSOR_LEN {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor.trim_end_matches('=')).ok()?;
    let raw = String::from_utf8(bytes).ok()?;
    let mut parts = raw.split(':');
    let (Some(version), Some(position), Some(sum), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if version != CURSOR_VERSION {
        return None;
    }
    let position: i64 = position.parse().ok()?;
    (position > 0 && sum == check(position, scope)).then_some(position)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NONE: CursorScope<'static> = CursorScope {
        customer_id: None,
        status: None,
    };

    #[test]
    fn a_cursor_round_trips() {
        let c = encode(42, NONE);
        assert_eq!(decode(&c, NONE), Some(42));
    }

    #[test]
    fn a_tampered_or_foreign_cursor_is_refused() {
        let c = encode(42, NONE);
        let forged = URL_SAFE_NO_PAD.encode("v1:43:00000000");
        assert_eq!(decode(&forged, NONE), None);
        assert_eq!(decode("not base64 !", NONE), None);
        assert_eq!(decode("", NONE), None);
        let placed = CursorScope {
            customer_id: None,
            status: Some("placed"),
        };
        assert_eq!(decode(&c, placed), None);
        let mut chars: Vec<char> = c.chars().collect();
        chars[3] = if chars[3] == 'A' { 'B' } else { 'A' };
        let mangled: String = chars.into_iter().collect();
        assert_eq!(decode(&mangled, NONE), None);
    }
}
