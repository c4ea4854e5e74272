//! Bearer-token authentication as a layer over every route but `/health`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses requests without `Authorization: Bearer <token>` matching the agent's token.
pub async fn require_token(
    State(token): State<Arc<String>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => Err(ApiError::unauthorized(
            "missing bearer token (Authorization: Bearer <token from the api.token file>)",
        )),
        Some(t) if same(t.as_bytes(), token.as_bytes()) => Ok(next.run(req).await),
        Some(_) => Err(ApiError::unauthorized("wrong bearer token")),
    }
}
