//! Cross-origin requests from browsers (CORS): which web origins may call an API, which
//! request headers they may send and which response headers their scripts may read. Off unless
//! `CORS_ALLOWED_ORIGINS` is set: without it no CORS header is sent, and a browser keeps a page
//! of another origin from reading any answer (the API itself is unchanged for other clients).
//!
//! It never relaxes authentication: a preflight (`OPTIONS`) is answered before the bearer
//! token check, as browsers send it without credentials, but the request that follows needs
//! its token as ever. No cookies are involved, so credentials are never allowed.

use std::time::Duration;

use anyhow::{anyhow, bail};
use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::context::{ACTOR_HEADER, CORRELATION_ID_HEADER, REQUEST_ID_HEADER, TRACEPARENT_HEADER};

/// How long a browser may cache a preflight's answer.
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The request headers of the APIs a page may send (beyond the CORS-safelisted ones). The
/// services' own headers are named here by value: `platform` depends on no service, and
/// allowing a header a service does not read is harmless.
pub const ALLOWED_REQUEST_HEADERS: [HeaderName; 10] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static(CORRELATION_ID_HEADER),
    HeaderName::from_static(ACTOR_HEADER),
    HeaderName::from_static(TRACEPARENT_HEADER),
    HeaderName::from_static("x-min-position"),
    HeaderName::from_static("last-event-id"),
];

/// The response headers of the APIs a page's script may read (beyond the safelisted ones).
pub const EXPOSED_RESPONSE_HEADERS: [HeaderName; 9] = [
    header::ETAG,
    header::LOCATION,
    header::RETRY_AFTER,
    HeaderName::from_static("x-projection-position"),
    HeaderName::from_static("x-held-back-version"),
    HeaderName::from_static("x-order-version"),
    HeaderName::from_static(CORRELATION_ID_HEADER),
    HeaderName::from_static(REQUEST_ID_HEADER),
    HeaderName::from_static("idempotent-replayed"),
];

/// The origins allowed to call the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `*`: any page may read the answers (a public read API).
    Any,
    /// These exact origins (`https://ops.example.com`, `http://localhost:3000`).
    List(Vec<HeaderValue>),
}

impl AllowedOrigins {
    /// Parses `CORS_ALLOWED_ORIGINS`: `*`, or a comma-separated list of origins, each
    /// `scheme://host[:port]` with no path. The error names what is wrong, for the one line a
    /// misconfigured binary prints.
    pub fn parse(raw: &str) -> anyhow::Result<Self> {
        let raw = raw.trim();
        if raw == "*" {
            return Ok(Self::Any);
        }
        let mut origins = Vec::new();
        for origin in raw.split(',').map(str::trim) {
            let (scheme, rest) = origin
                .split_once("://")
                .ok_or_else(|| anyhow!("`{origin}` is not an origin like https://host[:port]"))?;
            if !matches!(scheme, "http" | "https")
                || rest.is_empty()
                || rest.contains(['/', '?', '#', ' ', '*'])
            {
                bail!(
                    "`{origin}` is not an origin like https://host[:port] (no path, no wildcard)"
                );
            }
            // A port, if given, is written as a browser writes it in `Origin`, or the origin
            // would never match and browsers would be refused without a word (`[::1]` is a
            // host, not a port).
            if let Some((host, port)) = rest.rsplit_once(':')
                && !port.contains(']')
            {
                let written = !host.is_empty()
                    && !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && !port.starts_with('0')
                    && port.parse::<u16>().is_ok();
                if !written {
                    bail!(
                        "`{origin}` is not an origin like https://host[:port] \
                         (the port is 1 to 65535, in plain digits)"
                    );
                }
                let default = if scheme == "https" { "443" } else { "80" };
                if port == default {
                    bail!(
                        "`{origin}` names the default port, which browsers leave out of the \
                         Origin they send: write `{scheme}://{host}`"
                    );
                }
            }
            origins
                .push(HeaderValue::from_str(origin).map_err(|_| {
                    anyhow!("`{origin}` is not an origin like https://host[:port]")
                })?);
        }
        Ok(Self::List(origins))
    }
}

/// Wraps `router` (after `standard_layers`) so browsers at `origins` may call it; `None` leaves
/// it as it is.
pub fn with_cors(router: Router, origins: Option<&AllowedOrigins>) -> Router {
    let Some(origins) = origins else {
        return router;
    };
    let allow_origin = match origins {
        AllowedOrigins::Any => AllowOrigin::any(),
        AllowedOrigins::List(list) => AllowOrigin::list(list.iter().cloned()),
    };
    router.layer(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers(ALLOWED_REQUEST_HEADERS)
            .expose_headers(EXPOSED_RESPONSE_HEADERS)
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_as_any_or_a_list_of_exact_origins() {
        assert_eq!(AllowedOrigins::parse(" * ").unwrap(), AllowedOrigins::Any);
        assert_eq!(
            AllowedOrigins::parse("https://ops.example.com, http://localhost:3000").unwrap(),
            AllowedOrigins::List(vec![
                HeaderValue::from_static("https://ops.example.com"),
                HeaderValue::from_static("http://localhost:3000"),
            ])
        );
        for good in [
            "http://[::1]",
            "http://[::1]:8080",
            "https://a.example:65535",
            "https://a.example:80",
        ] {
            assert!(AllowedOrigins::parse(good).is_ok(), "{good:?} was refused");
        }
        for bad in [
            "",
            "ops.example.com",
            "https://",
            "https://ops.example.com/",
            "https://*.example.com",
            "ftp://files.example.com",
            "https://a.example.com,,https://b.example.com",
            "https://a.example:99999",
            "https://a.example:0",
            "https://a.example:",
            "https://:8080",
            "https://a.example:+80",
            "https://a.example:080",
            "https://a.example:443",
            "http://a.example:80",
        ] {
            assert!(AllowedOrigins::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
