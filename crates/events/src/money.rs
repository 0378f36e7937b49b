//! Value types of the order domain that are parsed, never trusted: currency codes, SKUs and the
//! limits on quantities and amounts. Money is always an `i64` count of minor units (cents).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest quantity of one line. Bounded so `quantity * unit_price` sums stay far from overflow
/// in realistic orders and a typo (`100000000`) is rejected instead of billed.
pub const MAX_QUANTITY: i64 = 10_000;

/// Largest order total (and so unit price and payment) accepted, in minor units: 2^53 - 1, the
/// largest integer a JSON number carries exactly in every client (JavaScript's
/// `Number.MAX_SAFE_INTEGER`, any reader that parses numbers as IEEE 754 doubles). Above it a
/// browser would show, and could pay, a rounded amount.
pub const MAX_AMOUNT: i64 = 9_007_199_254_740_991;

/// Largest number of distinct lines in one order; bounds the size of the state and of snapshots.
pub const MAX_LINES: usize = 200;

/// Longest SKU accepted, in bytes.
pub const MAX_SKU_LEN: usize = 64;

/// Longest free-text field (reason, carrier, tracking number, payment reference), in characters
/// (Unicode scalar values, as JSON Schema's `maxLength` counts them), once trimmed.
pub const MAX_TEXT_LEN: usize = 500;

/// Active ISO 4217 alphabetic codes (fund and precious-metal codes excluded).
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB \
BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD \
FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR \
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR \
MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK \
SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES \
VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG";

/// Longest part of a refused value quoted back in an error message: enough to recognise it,
/// while a megabyte of garbage in a path or body does not come back in the answer and the log.
pub const MAX_QUOTED_LEN: usize = 80;

/// `value` in backticks for an error message, cut to [`MAX_QUOTED_LEN`] bytes (at a character
/// boundary) with `…` when longer, its control characters written as escapes (`\u{0}`). The
/// message may be stored (an idempotency key's recorded refusal is `jsonb`), and PostgreSQL's
/// jsonb refuses NUL: echoed as it came, a NUL would turn a rule violation into a failure to
/// record it.
pub fn quoted(value: &str) -> String {
    let (shown, cut) = if value.len() <= MAX_QUOTED_LEN {
        (value, "")
    } else {
        (&value[..value.floor_char_boundary(MAX_QUOTED_LEN)], "…")
    };
    let mut out = String::with_capacity(shown.len() + 2 + cut.len());
    out.push('`');
    for c in shown.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out.push_str(cut);
    out.push('`');
    out
}

/// An ISO 4217 currency code such as `EUR`.
///
/// Input is checked against the codes this release knows ([`Currency::parse`], in `decide`).
/// What is read back from storage (an event's payload, a snapshot) is checked for its shape
/// only, three upper-case letters: it was checked against the list of the release that wrote
/// it, and the list changes both ways. A release that adds a code writes orders an older
/// instance must still load and project during a rolling update, and a code withdrawn from
/// ISO 4217 (as `ANG` is being replaced by `XCG`) must still read back in the orders stored
/// in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "StoredCurrencyCode", into = "String")]
pub struct Currency(String);

impl Currency {
    /// Parses an upper-case ISO 4217 code; `eur`, `EURO` and `XYZ` are rejected.
    pub fn parse(code: &str) -> Option<Self> {
        (has_code_shape(code) && Self::codes().any(|known| known == code))
            .then(|| Self(code.to_owned()))
    }

    /// Every code [`Self::parse`] accepts, in alphabetical order (for API descriptions).
    pub fn codes() -> impl Iterator<Item = &'static str> {
        ISO_4217.split_ascii_whitespace()
    }

    /// A code read back from our own storage, validated when it was first written. Not for
    /// input: a code later withdrawn from ISO 4217 must still read back as it was stored.
    pub(crate) fn from_stored(code: &str) -> Self {
        Self(code.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Three upper-case ASCII letters: the shape of every ISO 4217 alphabetic code.
fn has_code_shape(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// A currency code as stored, before its shape is checked: what [`Currency`] deserializes
/// from. It has no other use, so no input can reach [`Currency`] through it.
#[derive(Deserialize)]
#[serde(transparent)]
struct StoredCurrencyCode(String);

impl TryFrom<StoredCurrencyCode> for Currency {
    type Error = String;
    fn try_from(StoredCurrencyCode(code): StoredCurrencyCode) -> Result<Self, Self::Error> {
        if has_code_shape(&code) {
            Ok(Self(code))
        } else {
            Err(format!(
                "{} is not a currency code (three upper-case letters)",
                quoted(&code)
            ))
        }
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.0
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stock-keeping unit: 1 to 64 characters of letters, digits, `-`, `_` and `.`, so it is safe
/// in a URL path segment (`DELETE /orders/{id}/items/{sku}`). A SKU that is only `.` or `..`
/// is a path segment of its own ([`Sku::is_dot_segment`]): it reads, as stored, but a new line
/// may not have it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    pub fn parse(value: &str) -> Option<Self> {
        let valid = !value.is_empty()
            && value.len() <= MAX_SKU_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        valid.then(|| Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the SKU is `.` or `..`: URL clients (browsers, `fetch`, most HTTP libraries)
    /// resolve such a segment away, even written `%2E%2E`, so `DELETE /orders/{id}/items/..`
    /// reaches another route and the line could not be removed. Adding one is refused; lines
    /// an earlier release added still read, and remove with a client that sends the path as
    /// it is.
    pub fn is_dot_segment(&self) -> bool {
        matches!(self.0.as_str(), "." | "..")
    }
}

impl TryFrom<String> for Sku {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Sku::parse(&value).ok_or_else(|| format!("{} is not a valid SKU", quoted(&value)))
    }
}

impl From<Sku> for String {
    fn from(value: Sku) -> Self {
        value.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_value_is_cut_and_its_control_characters_escaped() {
        assert_eq!(quoted("SKU-1"), "`SKU-1`");
        assert_eq!(quoted("a\u{0}b\nc"), "`a\\u{0}b\\u{a}c`");
        let long = "é".repeat(100);
        let shown = quoted(&long);
        assert!(shown.ends_with("…`"), "{shown}");
        assert!(shown.len() <= MAX_QUOTED_LEN + "``…".len(), "{shown}");
    }

    #[test]
    fn known_upper_case_codes_are_currencies() {
        assert!(Currency::parse("EUR").is_some());
        assert!(Currency::parse("JPY").is_some());
        assert!(Currency::parse("eur").is_none());
        assert!(Currency::parse("XYZ").is_none());
        assert!(Currency::parse("EURO").is_none());
        assert!(Currency::parse("").is_none());
    }

    #[test]
    fn a_stored_code_reads_back_whether_or_not_this_release_lists_it() {
        let read = |json: &str| serde_json::from_str::<Currency>(json);
        // `DEM` was withdrawn long ago; a code added by a later release reads the same way.
        assert!(Currency::parse("DEM").is_none());
        assert_eq!(read(r#""DEM""#).expect("a withdrawn code").as_str(), "DEM");
        assert_eq!(read(r#""EUR""#).expect("a listed code").as_str(), "EUR");
        for malformed in [r#""eur""#, r#""EURO""#, r#""""#, r#""E1R""#, "42"] {
            assert!(read(malformed).is_err(), "{malformed} read as a currency");
        }
    }

    #[test]
    fn every_listed_code_parses_and_the_list_is_sorted() {
        let codes: Vec<&str> = Currency::codes().collect();
        assert!(codes.len() > 150, "{} codes", codes.len());
        assert!(
            codes.windows(2).all(|pair| pair[0] < pair[1]),
            "sorted, no duplicates"
        );
        assert!(codes.iter().all(|code| Currency::parse(code).is_some()));
    }

    #[test]
    fn skus_are_url_safe_and_bounded() {
        assert!(Sku::parse("BOOK-42_v1.0").is_some());
        assert!(Sku::parse("").is_none());
        assert!(Sku::parse("has space").is_none());
        assert!(Sku::parse("a/b").is_none());
        assert!(Sku::parse(&"x".repeat(MAX_SKU_LEN)).is_some());
        assert!(Sku::parse(&"x".repeat(MAX_SKU_LEN + 1)).is_none());
        for dots in [".", ".."] {
            assert!(Sku::parse(dots).is_some_and(|sku| sku.is_dot_segment()));
        }
        for not_dots in ["...", ".a", "a..", "-"] {
            assert!(Sku::parse(not_dots).is_some_and(|sku| !sku.is_dot_segment()));
        }
    }
}
