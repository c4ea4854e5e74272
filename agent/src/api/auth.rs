//! Bearer-token authentication as a layer over every route but `/health`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;

/// Which listener a request came through (set per connection by the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The TCP listener: the bearer token is required.
    Tcp,
    /// The Unix socket: reaching it takes write access to a 0660 socket in a 0750 directory
    /// of the agent's, so its user and group (the operators) need no token (they cannot read
    /// the 0600 token file).
    UnixSocket,
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request, if any.
fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether the request may see what the token protects.
pub fn authorised(req: &Request, token: &str) -> bool {
    req.extensions().get::<Via>() == Some(&Via::UnixSocket)
        || bearer(req).is_some_and(|t| same(t.as_bytes(), token.as_bytes()))
}

/// Refuses requests without `Authorization: Bearer <token>` matching the agent's token
/// (except through the Unix socket).
pub async fn require_token(
    State(token): State<Arc<String>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if req.extensions().get::<Via>() == Some(&Via::UnixSocket) {
        return Ok(next.run(req).await);
    }
    match bearer(&req) {
        None => Err(ApiError::unauthorized(
            "missing bearer token (Authorization: Bearer <token from the api.token file>)",
        )),
        Some(t) if same(t.as_bytes(), token.as_bytes()) => Ok(next.run(req).await),
        Some(_) => Err(ApiError::unauthorized("wrong bearer token")),
    }
}
