//! `/api/v1/rules` and `/api/v1/workloads/{id}/effective-rules`: log-scan rules, changed in
//! the database and applied to running tails at once (the rules are reloaded after each
//! change).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::error::ApiError;
use super::routes::{ApiState, with_conn};
use crate::scan::admin::{self, OverrideRequest, RuleList, RuleRequest, TrialAnswer, TrialRequest};
use crate::scan::rules::Rule;
use crate::store::rules::{self, RuleError, RulePatch};

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
    Path(id): Path<u64>,
) -> Result<Json<Rule>, ApiError> {
    with_conn(&st, move |c| {
        Ok(rules::get(c, id)?.ok_or(RuleError::UnknownId(id))?)
    })
    .await
    .map(Json)
}

pub(super) async fn patch(
    State(st): State<ApiState>,
    Path(id): Path<u64>,
    body: Result<Json<RulePatch>, JsonRejection>,
) -> Result<Json<Rule>, ApiError> {
    let p = body?.0;
    change(&st, move |c| rules::update(c, id, p))
        .await
        .map(Json)
}

pub(super) async fn delete(
    State(st): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<StatusCode, ApiError> {
    change(&st, move |c| match rules::delete(c, id)? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(RuleError::UnknownId(id)),
    })
    .await
}

pub(super) async fn put_override(
    State(st): State<ApiState>,
    Path((id, workload)): Path<(u64, String)>,
    body: Result<Json<OverrideRequest>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
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
