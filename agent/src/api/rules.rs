//! `/api/v1/rules` and `/api/v1/workloads/{id}/effective-rules`: log-scan rules, changed in
//! the database and applied to running tails at once (the rules are reloaded after each
//! change).

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::error::ApiError;
use super::routes::{ApiState, with_conn};
use crate::scan::admin::{self, OverrideRequest, RuleList, RuleRequest, TrialAnswer, TrialRequest};
use crate::scan::rule_store::{self as rules, RuleError, RulePatch};
use crate::scan::rules::Rule;

impl From<RuleError> for ApiError {
    fn from(e: RuleError) -> Self {
        let detail = e.to_string();
        match e {
            RuleError::Pattern { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_pattern", detail)
            }
            RuleError::UnknownId(_) | RuleError::UnknownName(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
            }
            RuleError::AmbiguousName { .. } | RuleError::NotGlobal(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", detail)
            }
            RuleError::NotNullable(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", detail)
            }
            RuleError::Store(_) => ApiError::internal(detail),
        }
    }
}

/// Runs a rule change, then reloads the rules in force.
async fn change<T, F>(st: &ApiState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&duckdb::Connection) -> Result<T, RuleError> + Send + 'static,
{
    let logscan = st.status.logscan.clone();
    with_conn(st, move |c| {
        let out = f(c)?;
        if let Some(l) = logscan {
            l.reload(c)?;
        }
        Ok(out)
    })
    .await
}

pub(super) async fn list(State(st): State<ApiState>) -> Result<Json<RuleList>, ApiError> {
    with_conn(&st, |c| Ok(admin::list(c)?)).await.map(Json)
}

pub(super) async fn create(
    State(st): State<ApiState>,
    body: Result<Json<RuleRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Rule>), ApiError> {
    let req = body?.0;
    let rule = change(&st, move |c| admin::add(c, &req)).await?;
    Ok((StatusCode::CREATED, Json(rule)))
}

pub(super) async fn get_one(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Rule>, ApiError> {
    let id = id?.0;
    with_conn(&st, move |c| {
        Ok(rules::get(c, id)?.ok_or(RuleError::UnknownId(id))?)
    })
    .await
    .map(Json)
}

pub(super) async fn patch(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
    body: Result<Json<RulePatch>, JsonRejection>,
) -> Result<Json<Rule>, ApiError> {
    let id = id?.0;
    let p = body?.0;
    change(&st, move |c| rules::update(c, id, p))
        .await
        .map(Json)
}

pub(super) async fn delete(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = id?.0;
    change(&st, move |c| match rules::delete(c, id)? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(RuleError::UnknownId(id)),
    })
    .await
}

pub(super) async fn put_override(
    State(st): State<ApiState>,
    path: Result<Path<(u64, String)>, PathRejection>,
    body: Result<Json<OverrideRequest>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let (id, workload) = path?.0;
    let req = body?.0;
    change(&st, move |c| admin::set_override(c, id, &workload, &req)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn trial(
    State(st): State<ApiState>,
    body: Result<Json<TrialRequest>, JsonRejection>,
) -> Result<Json<TrialAnswer>, ApiError> {
    let req = body?.0;
    with_conn(&st, move |c| Ok(admin::trial(c, &req)?))
        .await
        .map(Json)
}

pub(super) async fn effective(
    State(st): State<ApiState>,
    Path(workload): Path<String>,
) -> Result<Json<Vec<Rule>>, ApiError> {
    with_conn(&st, move |c| Ok(admin::effective_rules(c, &workload)?))
        .await
        .map(Json)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::Method;
    use serde_json::json;

    use crate::api::routes::router;
    use crate::api::test_support::{TOKEN, call, state};
    use crate::docker::logscan::LogScan;
    use crate::store::database::Database;

    #[tokio::test]
    async fn crud_round_trip_partial_patch_and_live_reload() {
        let dir = std::env::temp_dir().join(format!("nattrail-rules-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Arc::new(Database::open_rw(&dir.join("t.duckdb")).unwrap());
        let logscan = Arc::new(LogScan::load(&db.connect().unwrap()).unwrap());
        let app = router(
            state(db, Some(Arc::clone(&logscan))),
            Arc::new(TOKEN.into()),
            std::time::Duration::from_secs(30),
        );
        let (st, created) = call(
            &app,
            Method::POST,
            "/api/v1/rules",
            Some(
                json!({"name": "oom", "pattern": r"out of memory: (?P<proc>\w+)",
                        "severity": "critical", "cooldown_s": 30}),
            ),
        )
        .await;
        assert_eq!(st, 201, "{created}");
        let id = created["id"].as_u64().unwrap();
        assert_eq!(created["stream"], "both");
        assert_eq!(logscan.live.load().effective(&["any".into()]).len(), 1);

        // PATCH changes only what was sent.
        let (st, patched) = call(
            &app,
            Method::PATCH,
            &format!("/api/v1/rules/{id}"),
            Some(json!({"name": "oom-killer"})),
        )
        .await;
        assert_eq!(st, 200, "{patched}");
        let mut expected = created.clone();
        expected["name"] = json!("oom-killer");
        assert_eq!(patched, expected);
        // A bad pattern is refused and leaves the rule as it was.
        let (st, err) = call(
            &app,
            Method::PATCH,
            &format!("/api/v1/rules/{id}"),
            Some(json!({"pattern": "(x"})),
        )
        .await;
        assert_eq!((st, err["error"].as_str()), (422, Some("bad_pattern")));
        let (_, now) = call(&app, Method::GET, &format!("/api/v1/rules/{id}"), None).await;
        assert_eq!(now, expected);
        // Null for a required field is refused.
        let (st, _) = call(
            &app,
            Method::PATCH,
            &format!("/api/v1/rules/{id}"),
            Some(json!({"name": null})),
        )
        .await;
        assert_eq!(st, 400);

        // A workload turns the global rule off; another keeps it.
        let (st, _) = call(
            &app,
            Method::PUT,
            &format!("/api/v1/rules/{id}/overrides/batch"),
            Some(json!({"enabled": false})),
        )
        .await;
        assert_eq!(st, 204);
        let (_, eff) = call(
            &app,
            Method::GET,
            "/api/v1/workloads/batch/effective-rules",
            None,
        )
        .await;
        assert_eq!(eff, json!([]));
        let (_, eff) = call(
            &app,
            Method::GET,
            "/api/v1/workloads/web/effective-rules",
            None,
        )
        .await;
        assert_eq!(eff.as_array().unwrap().len(), 1);
        assert!(logscan.live.load().effective(&["batch".into()]).is_empty());

        let line = "kernel: out of memory: java";
        let (_, t) = call(
            &app,
            Method::POST,
            "/api/v1/rules/test",
            Some(json!({"line": line})),
        )
        .await;
        assert_eq!(t["matched"], true);
        assert_eq!(t["matches"][0]["captures"]["proc"], "java");
        assert_eq!(t["matches"][0]["severity"], "critical");
        let (_, t) = call(
            &app,
            Method::POST,
            "/api/v1/rules/test",
            Some(json!({"line": line, "workload": "batch"})),
        )
        .await;
        assert_eq!(t["matched"], false);

        let (st, _) = call(&app, Method::DELETE, &format!("/api/v1/rules/{id}"), None).await;
        assert_eq!(st, 204);
        let (_, list) = call(&app, Method::GET, "/api/v1/rules", None).await;
        assert_eq!(
            list,
            json!({"rules": [], "overrides": [], "compile_errors": []})
        );
        assert!(logscan.live.load().effective(&["web".into()]).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
