//! What the API's unit tests share: a state over a scratch database and one request helper.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use serde_json::Value;
use tower::ServiceExt;

use super::routes::{ApiState, Limits};
use crate::conntrack::reader::ReaderStats;
use crate::docker::logscan::LogScan;
use crate::pipeline::registry::Registry;
use crate::status::StatusSource;
use crate::store::database::Database;
use crate::store::writer::WriterStats;

/// The token the tests' router is built with.
pub const TOKEN: &str = "t";

/// A state over `db`, with log scanning when given.
pub fn state(db: Arc<Database>, logscan: Option<Arc<LogScan>>) -> ApiState {
    ApiState::new(
        db,
        StatusSource::new(
            Arc::new(Registry::default()),
            Arc::default(),
            Arc::new(ReaderStats::default()),
            Arc::new(WriterStats::default()),
            Arc::default(),
            logscan,
        ),
        Limits {
            max_body_bytes: 4096,
            sql_row_limit: 100,
            sql_timeout: Duration::from_secs(5),
            sql_max_bytes: 1 << 20,
            sql_max_concurrent: 2,
        },
        Default::default(),
    )
}

/// One authorised request; the status and the JSON body (null when there is none).
pub async fn call(app: &axum::Router, m: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let req = Request::builder()
        .method(m)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}
