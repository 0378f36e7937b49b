//! Optional bearer-token authentication for API routes.
//!
//! With a token configured (`API_TOKEN`), a request needs `Authorization: Bearer <token>`,
//! compared in constant time; otherwise it gets a 401 `unauthorized` problem with
//! `WWW-Authenticate: Bearer`. With no token every request passes. Binaries apply the layer to
//! API routes only, never to `/healthz`, `/readyz` or `/metrics`. The token is never logged.

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

/// A layer requiring the bearer token when one is configured:
/// `router.route_layer(auth::require_bearer_token(args.auth.token()))`.
pub fn require_bearer_token(token: Option<Arc<str>>) -> BearerAuthLayer {
    BearerAuthLayer { token }
}

/// Whether the request's `Authorization` header carries `token` (constant-time compare).
pub fn is_authorized(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, presented)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    // ct_eq on slices of different lengths returns false without comparing bytes; the length
    // of the configured token is not a secret worth hiding.
    presented.trim().as_bytes().ct_eq(token.as_bytes()).into()
}

/// The tower layer returned by [`require_bearer_token`].
#[derive(Clone)]
pub struct BearerAuthLayer {
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for BearerAuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuthLayer")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl<S> Layer<S> for BearerAuthLayer {
    type Service = BearerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service wrapped by [`BearerAuthLayer`].
#[derive(Clone)]
pub struct BearerAuth<S> {
    inner: S,
    token: Option<Arc<str>>,
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
        let denied = match &self.token {
            Some(token) => !is_authorized(req.headers(), token),
            None => false,
        };
        if denied {
            return Box::pin(async { Ok(Problem::unauthorized().into_response()) });
        }
        Box::pin(self.inner.call(req))
    }
}
