//! The routes and their handlers. Queries run on blocking threads, each on a connection of
//! its own while it runs (kept for the next one), so they answer while the writer ingests.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use chrono::Utc;
use serde_json::json;

use super::auth::{authorised, require_token};
use super::error::ApiError;
use super::rules;
use super::triggers;
use crate::query::attribution::attribute;
use crate::query::coverage::KeptCoverage;
use crate::query::events::{EventsPage, events};
use crate::query::flows::{FlowRow, flows};
use crate::query::request::{EventsRequest, FlowsRequest, SqlRequest, WhoRequest};
use crate::query::sql::{SqlLimits, SqlResult, run_sql};
use crate::query::who::{WhoAnswer, who_kept};
use crate::status::{AgentState, DatabaseInfo, StatusReport, StatusSource};
use crate::store::database::Database;
use crate::store::gaps;

/// Every route, as (method, path): the OpenAPI document in `schemas/` is checked against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/api/v1/stats"),
    ("get", "/api/v1/who"),
    ("get", "/api/v1/flows"),
    ("get", "/api/v1/events"),
    ("post", "/api/v1/sql"),
    ("get", "/api/v1/rules"),
    ("post", "/api/v1/rules"),
    ("get", "/api/v1/rules/{id}"),
    ("patch", "/api/v1/rules/{id}"),
    ("delete", "/api/v1/rules/{id}"),
    ("put", "/api/v1/rules/{id}/overrides/{workload}"),
    ("post", "/api/v1/rules/test"),
    ("get", "/api/v1/workloads/{id}/effective-rules"),
    ("get", "/api/v1/triggers"),
    ("post", "/api/v1/triggers"),
    ("get", "/api/v1/triggers/{id}"),
    ("patch", "/api/v1/triggers/{id}"),
    ("delete", "/api/v1/triggers/{id}"),
    ("post", "/api/v1/triggers/{id}/test"),
];

/// Limits of the query endpoints.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Most rows `/sql` returns.
    pub sql_row_limit: usize,
    /// `/sql` time limit.
    pub sql_timeout: Duration,
    /// Largest `/sql` answer in bytes of JSON.
    pub sql_max_bytes: usize,
    /// `/sql` queries at once.
    pub sql_max_concurrent: usize,
}

impl Limits {
    /// The limits `[api]` sets.
    pub fn from_config(cfg: &crate::config::ApiConfig) -> Self {
        Limits {
            max_body_bytes: cfg.max_body_bytes,
            sql_row_limit: cfg.sql_row_limit,
            sql_timeout: Duration::from_millis(cfg.sql_timeout_ms),
            sql_max_bytes: cfg.sql_max_result_bytes,
            sql_max_concurrent: cfg.sql_max_concurrent.max(1),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The agent's database (read connections are made from it).
    pub db: Arc<Database>,
    /// The agent's counters.
    pub status: StatusSource,
    /// Query limits.
    pub limits: Limits,
    /// Trigger administration.
    pub triggers: super::triggers::TriggerAccess,
    /// One permit per `/sql` query running; none left answers 429.
    pub sql_slots: Arc<tokio::sync::Semaphore>,
    /// The handlers' connections between requests.
    conns: Arc<Connections>,
    /// The trail's coverage, kept between lookups until the writer changes it.
    coverage: Arc<KeptCoverage>,
}

/// How many idle connections the handlers keep.
const IDLE_CONNECTIONS: usize = 4;

/// Connections kept between requests: each keeps the plans of the statements it prepared,
/// and a lookup on a new connection prepares them all again (a `who` on the 1-day bench trail
/// took 7.7-9.1 ms so, 3.7-5.2 ms on a kept one).
struct Connections {
    db: Arc<Database>,
    idle: std::sync::Mutex<Vec<duckdb::Connection>>,
}

impl Connections {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<duckdb::Connection>> {
        // A handler that panicked holds no connection of the list: it is whole.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Result<duckdb::Connection, ApiError> {
        match self.idle().pop() {
            Some(c) => Ok(c),
            None => self
                .db
                .connect()
                .map_err(|e| ApiError::internal(format!("connecting to the database: {e}"))),
        }
    }

    /// Keeps `conn` unless a transaction was left open on it: the next request would read
    /// that transaction's snapshot, never the writer's later commits. (duckdb-rs's
    /// `is_autocommit` answers true whatever the state; a ROLLBACK fails when none is open.)
    fn put_back(&self, conn: duckdb::Connection) {
        if conn.execute_batch("ROLLBACK").is_ok() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }
}

impl ApiState {
    /// The handlers' state, with `limits.sql_max_concurrent` query slots.
    pub fn new(
        db: Arc<Database>,
        status: StatusSource,
        limits: Limits,
        triggers: super::triggers::TriggerAccess,
    ) -> Self {
        let sql_slots = Arc::new(tokio::sync::Semaphore::new(limits.sql_max_concurrent));
        let conns = Arc::new(Connections {
            db: Arc::clone(&db),
            idle: Default::default(),
        });
        ApiState {
            conns,
            coverage: Arc::new(KeptCoverage::of(Arc::clone(&db))),
            db,
            status,
            limits,
            triggers,
            sql_slots,
        }
    }
}

/// Runs `f` on a blocking thread with a connection no other request uses meanwhile.
pub(super) async fn with_conn<T, F>(st: &ApiState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&duckdb::Connection) -> Result<T, ApiError> + Send + 'static,
{
    let conns = Arc::clone(&st.conns);
    tokio::task::spawn_blocking(move || {
        let conn = conns.take()?;
        let out = f(&conn);
        conns.put_back(conn);
        out
    })
    .await
    .map_err(|e| ApiError::internal(format!("query task failed: {e}")))?
}

/// Liveness for anyone; the database served only for a caller holding the token (the CLI
/// checks it is talking to the agent of its database), since paths tell an attacker where
/// the evidence lies.
async fn health(State(st): State<ApiState>, req: axum::extract::Request) -> impl IntoResponse {
    let token = req
        .extensions()
        .get::<HealthToken>()
        .map(|t| Arc::clone(&t.0));
    if token.is_some_and(|t| authorised(&req, &t)) {
        Json(json!({"status": "ok", "db": st.db.path().display().to_string()}))
    } else {
        Json(json!({"status": "ok"}))
    }
}

/// The token, handed to `/health` (the only route outside the token layer).
#[derive(Clone)]
struct HealthToken(Arc<String>);

/// Answers 408 when a request takes longer than the API's request timeout (queries have
/// their own, shorter limits; this bounds everything else a connection may hold).
async fn request_timeout(
    State(limit): State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    tokio::time::timeout(limit, next.run(req))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("the request took longer than {limit:?} (api.request_timeout_ms)"),
            )
        })
}

async fn metrics_text(State(st): State<ApiState>) -> impl IntoResponse {
    let text = st.status.metrics.render();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
}

async fn stats(State(st): State<ApiState>) -> Result<Json<StatusReport>, ApiError> {
    let snapshot = st.status.snapshot(true);
    let path = st.db.path().to_path_buf();
    let gaps_24h = with_conn(&st, |c| {
        gaps::since(c, Utc::now().timestamp_micros() - crate::status::DAY_US)
            .map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?;
    Ok(Json(StatusReport {
        agent_state: AgentState::Running,
        agent: Some(snapshot),
        database: DatabaseInfo::of(&path),
        gaps_from: "database".into(),
        gaps_24h,
    }))
}

async fn who_route(
    State(st): State<ApiState>,
    q: Result<Query<WhoRequest>, QueryRejection>,
) -> Result<Json<WhoAnswer>, ApiError> {
    let q = q?.0.to_query(true)?;
    let kept = Arc::clone(&st.coverage);
    with_conn(&st, move |c| {
        let mut ans = who_kept(c, &q, &kept)?;
        attribute(c, ans.matches.iter_mut().map(|m| &mut m.flow))?;
        Ok(ans)
    })
    .await
    .map(Json)
}

async fn flows_route(
    State(st): State<ApiState>,
    q: Result<Query<FlowsRequest>, QueryRejection>,
) -> Result<Json<Vec<FlowRow>>, ApiError> {
    let q = q?.0.to_query()?;
    with_conn(&st, move |c| {
        let mut rows = flows(c, &q)?;
        attribute(c, rows.iter_mut())?;
        Ok(rows)
    })
    .await
    .map(Json)
}

async fn events_route(
    State(st): State<ApiState>,
    q: Result<Query<EventsRequest>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    let q = q?.0.to_query()?;
    with_conn(&st, move |c| Ok(events(c, &q)?)).await.map(Json)
}

async fn sql_route(
    State(st): State<ApiState>,
    body: Result<Json<SqlRequest>, JsonRejection>,
) -> Result<Json<SqlResult>, ApiError> {
    let req = body?.0;
    let max_rows = req.limit.unwrap_or(st.limits.sql_row_limit);
    if max_rows == 0 || max_rows > st.limits.sql_row_limit {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "limit {max_rows} outside 1..={} (api.sql_row_limit)",
                st.limits.sql_row_limit
            ),
        ));
    }
    let timeout = req
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(st.limits.sql_timeout)
        .min(st.limits.sql_timeout);
    // A full house is refused at once: queued queries would hold their callers' connections
    // open and still pile up behind a slow one.
    let permit = Arc::clone(&st.sql_slots).try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!(
                "{} SQL queries are running already (api.sql_max_concurrent); try again",
                st.limits.sql_max_concurrent
            ),
        )
    })?;
    let limits = SqlLimits {
        max_rows,
        max_bytes: st.limits.sql_max_bytes,
        timeout,
    };
    let db = Arc::clone(&st.db);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        run_sql(&db, &req.sql, &limits)
    })
    .await
    .map_err(|e| ApiError::internal(format!("query task failed: {e}")))?
    .map(Json)
    .map_err(ApiError::from)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The whole API: `/health` open, everything else behind the token; every request bounded
/// by `request_timeout`.
pub fn router(state: ApiState, token: Arc<String>, request_timeout_after: Duration) -> Router {
    let health_token = HealthToken(Arc::clone(&token));
    let protected = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/who", get(who_route))
        .route("/api/v1/flows", get(flows_route))
        .route("/api/v1/events", get(events_route))
        .route("/api/v1/sql", post(sql_route))
        .route("/api/v1/rules", get(rules::list).post(rules::create))
        .route("/api/v1/rules/test", post(rules::trial))
        .route(
            "/api/v1/rules/{id}",
            get(rules::get_one)
                .patch(rules::patch)
                .delete(rules::delete),
        )
        .route(
            "/api/v1/rules/{id}/overrides/{workload}",
            put(rules::put_override),
        )
        .route(
            "/api/v1/workloads/{id}/effective-rules",
            get(rules::effective),
        )
        .route(
            "/api/v1/triggers",
            get(triggers::list).post(triggers::create),
        )
        .route(
            "/api/v1/triggers/{id}",
            get(triggers::get_one)
                .patch(triggers::patch)
                .delete(triggers::delete),
        )
        .route("/api/v1/triggers/{id}/test", post(triggers::test))
        .fallback(not_found)
        .layer(from_fn_with_state(token, require_token));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(axum::Extension(health_token))
        .layer(from_fn_with_state(request_timeout_after, request_timeout))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::ServiceExt;

    use super::*;

    const OPENAPI: &str = include_str!("../../../schemas/api/openapi.json");

    #[test]
    fn openapi_document_lists_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, served);
    }

    #[tokio::test]
    async fn a_connection_is_kept_for_the_next_request_unless_left_in_a_transaction() {
        let dir = std::env::temp_dir().join(format!("nattrail-conns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Arc::new(Database::open_rw(&dir.join("t.duckdb")).unwrap());
        let state = crate::api::test_support::state(Arc::clone(&db), None);
        let idle = |st: &ApiState| st.conns.idle().len();
        let run = |sql: &'static str| {
            with_conn(&state, move |c| {
                c.execute_batch(sql)
                    .map_err(|e| ApiError::internal(e.to_string()))
            })
        };
        assert_eq!(idle(&state), 0);
        run("SELECT 1").await.unwrap();
        assert_eq!(idle(&state), 1);
        run("SELECT 1").await.unwrap();
        assert_eq!(idle(&state), 1, "the same connection, taken and given back");
        // Left in a transaction: its snapshot would hide every later commit.
        run("BEGIN TRANSACTION; SELECT count(*) FROM schema_version")
            .await
            .unwrap();
        assert_eq!(idle(&state), 0);
        db.connect()
            .unwrap()
            .execute_batch("CREATE TABLE later AS SELECT 7 AS v")
            .unwrap();
        let v = with_conn(&state, |c| {
            c.query_row("SELECT v FROM later", [], |r| r.get::<_, i32>(0))
                .map_err(|e| ApiError::internal(e.to_string()))
        })
        .await
        .unwrap();
        assert_eq!(v, 7);
        // A failed statement leaves the connection usable and kept.
        assert!(run("SELECT * FROM no_such_table").await.is_err());
        assert_eq!(idle(&state), 1);
        drop(state);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn every_listed_route_is_served_and_guarded() {
        let dir = std::env::temp_dir().join(format!("nattrail-routes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Arc::new(Database::open_rw(&dir.join("t.duckdb")).unwrap());
        let state = crate::api::test_support::state(db, None);
        let app = router(state, Arc::new("secret".into()), Duration::from_secs(30));
        for (method, path) in ROUTES {
            let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let bare = Request::builder()
                .method(m.clone())
                .uri(*path)
                .body(Body::empty());
            let status = app.clone().oneshot(bare.unwrap()).await.unwrap().status();
            if *path == "/health" {
                assert_eq!(status, StatusCode::OK);
            } else {
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} without token"
                );
            }
            let authed = Request::builder()
                .method(m)
                .uri(*path)
                .header("authorization", "Bearer secret")
                .body(Body::empty())
                .unwrap();
            let status = app.clone().oneshot(authed).await.unwrap().status();
            // Reached its handler: at worst a validation error, never "no such route".
            assert!(
                status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {status}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
