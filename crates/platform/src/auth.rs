//! Optional bearer-token authentication for API routes.
//!
//! With tokens configured (`API_TOKEN`), a request needs `Authorization: Bearer <token>` with
//! one of them, compared in constant time; otherwise it gets a 401 `unauthorized` problem with
//! `WWW-Authenticate: Bearer`. More than one token (`API_TOKEN=new,old`) is how a token is
//! rotated without refusing anyone: deploy both, move the clients to the new one, deploy it
//! alone. With no token every request passes. Binaries apply the layer to API routes only,
//! never to `/healthz`, `/readyz` or `/metrics`. No token is ever logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::header::AUTHORIZATION;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use crate::problem::Problem;

/// The bearer tokens a request may present: one, or several while a token is being rotated.
#[derive(Clone)]
pub struct BearerTokens(Arc<[Box<str>]>);

impl BearerTokens {
    /// The tokens of a comma-separated list (bearer tokens never hold a comma), each trimmed;
    /// `None` when the list holds none.
    pub fn parse(list: &str) -> Option<Self> {
        let tokens: Arc<[Box<str>]> = list
            .split(',')
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(Box::from)
            .collect();
        (!tokens.is_empty()).then_some(Self(tokens))
    }

    /// Whether `presented` is one of the tokens. It is compared with every one of them, each in
    /// constant time, so the time taken tells neither which one matched nor how much of one
    /// did. (`ct_eq` on slices of different lengths returns false without comparing bytes; the
    /// length of a configured token is not a secret worth hiding.)
    pub fn accepts(&self, presented: &str) -> bool {
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |matched, token| {
                matched | presented.as_bytes().ct_eq(token.as_bytes())
            })
            .into()
    }
}

impl std::fmt::Debug for BearerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BearerTokens(<{} redacted>)", self.0.len())
    }
}

/// A layer requiring one of the bearer tokens when any is configured:
/// `router.route_layer(auth::require_bearer_token(args.auth.tokens()))`.
pub fn require_bearer_token(tokens: Option<BearerTokens>) -> BearerAuthLayer {
    BearerAuthLayer { tokens }
}

/// Whether the request's `Authorization` header carries one of `tokens`.
pub fn is_authorized(headers: &axum::http::HeaderMap, tokens: &BearerTokens) -> bool {
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, presented)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && tokens.accepts(presented.trim())
}

/// The tower layer returned by [`require_bearer_token`].
#[derive(Clone, Debug)]
pub struct BearerAuthLayer {
    tokens: Option<BearerTokens>,
}

impl<S> Layer<S> for BearerAuthLayer {
    type Service = BearerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service wrapped by [`BearerAuthLayer`].
#[derive(Clone)]
pub struct BearerAuth<S> {
    inner: S,
    tokens: Option<BearerTokens>,
}

impl<S> Service<Request> for BearerAuth<S>
where
    S: Service<Request, Response = Response> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let denied = match &self.tokens {
            Some(tokens) => !is_authorized(req.headers(), tokens),
            None => false,
        };
        if denied {
            return Box::pin(async { Ok(Problem::unauthorized().into_response()) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_accepts_each_of_its_tokens_and_nothing_else() {
        let tokens = BearerTokens::parse(" new-token , old-token,").expect("two tokens");
        assert!(tokens.accepts("new-token"));
        assert!(tokens.accepts("old-token"));
        for wrong in ["", "new", "new-token2", "new-token,old-token", " new-token"] {
            assert!(!tokens.accepts(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn a_list_without_a_token_is_none_and_tokens_never_print() {
        assert!(BearerTokens::parse("").is_none());
        assert!(BearerTokens::parse(" , ,").is_none());
        let tokens = BearerTokens::parse("s3cret,0ther").expect("tokens");
        let printed = format!(
            "{tokens:?} {:?}",
            require_bearer_token(Some(tokens.clone()))
        );
        assert!(
            !printed.contains("s3cret") && !printed.contains("0ther"),
            "{printed}"
        );
    }
}
