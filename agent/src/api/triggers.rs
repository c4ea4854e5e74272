//! `/api/v1/triggers`: webhook triggers, changed in the database and applied by the running
//! dispatcher at once. Secrets never come back: reads show a placeholder.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::error::ApiError;
use super::routes::{ApiState, with_conn};
use crate::store::secrets::SecretStore;
use crate::triggers::delivery::Outcome;
use crate::triggers::dispatcher::Dispatcher;
use crate::triggers::ssrf::Guard;
use crate::triggers::trigger_store::{
    self as triggers, NewTrigger, Trigger, TriggerError, TriggerPatch,
};

/// What the trigger routes need: the SSRF guard (URLs are checked when saved) and the
/// running dispatcher, if any.
#[derive(Clone, Default)]
pub struct TriggerAccess {
    /// The agent's guard.
    pub guard: Arc<Guard>,
    /// The dispatcher, reloaded after each change.
    pub dispatcher: Option<Arc<Dispatcher>>,
}

impl From<TriggerError> for ApiError {
    fn from(e: TriggerError) -> Self {
        let detail = e.to_string();
        match e {
            TriggerError::Filter { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_pattern", detail)
            }
            TriggerError::Url(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_url", detail)
            }
            TriggerError::UnknownId(_) | TriggerError::UnknownName(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
            }
            TriggerError::NameTaken(_) => ApiError::new(StatusCode::CONFLICT, "conflict", detail),
            TriggerError::NotNullable(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", detail)
            }
            TriggerError::Store(_) | TriggerError::Secrets(_) => ApiError::internal(detail),
        }
    }
}

async fn change<T, F>(st: &ApiState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&duckdb::Connection, &SecretStore, &Guard) -> Result<T, TriggerError>
        + Send
        + 'static,
{
    let access = st.triggers.clone();
    let secrets = st.db.secrets();
    with_conn(st, move |c| {
        let out = f(c, &secrets, &access.guard)?;
        if let Some(d) = &access.dispatcher {
            d.reload()?;
        }
        Ok(out)
    })
    .await
}

pub(super) async fn list(State(st): State<ApiState>) -> Result<Json<Vec<Trigger>>, ApiError> {
    let secrets = st.db.secrets();
    with_conn(&st, move |c| {
        Ok(triggers::list(c, &secrets)?
            .into_iter()
            .map(Trigger::redacted)
            .collect())
    })
    .await
    .map(Json)
}

pub(super) async fn create(
    State(st): State<ApiState>,
    body: Result<Json<NewTrigger>, JsonRejection>,
) -> Result<(StatusCode, Json<Trigger>), ApiError> {
    let n = body?.0;
    let t = change(&st, move |c, s, g| triggers::insert(c, s, &n, g)).await?;
    Ok((StatusCode::CREATED, Json(t.redacted())))
}

pub(super) async fn get_one(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Trigger>, ApiError> {
    let id = id?.0;
    let secrets = st.db.secrets();
    with_conn(&st, move |c| Ok(triggers::get(c, &secrets, id)?.redacted()))
        .await
        .map(Json)
}

pub(super) async fn patch(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
    body: Result<Json<TriggerPatch>, JsonRejection>,
) -> Result<Json<Trigger>, ApiError> {
    let id = id?.0;
    let p = body?.0;
    change(&st, move |c, s, g| triggers::update(c, s, id, p, g))
        .await
        .map(|t| Json(t.redacted()))
}

pub(super) async fn delete(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = id?.0;
    change(&st, move |c, s, _| match triggers::delete(c, s, id)? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(TriggerError::UnknownId(id)),
    })
    .await
}

pub(super) async fn test(
    State(st): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<Outcome>, ApiError> {
    let id = id?.0;
    let Some(d) = st.triggers.dispatcher.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "webhooks are disabled in this agent ([webhooks] enabled = false)",
        ));
    };
    let secrets = st.db.secrets();
    let t = with_conn(&st, move |c| Ok(triggers::get(c, &secrets, id)?)).await?;
    Ok(Json(d.test(&t).await))
}

#[cfg(test)]
mod tests {
    use axum::http::Method;
    use serde_json::json;

    use super::*;
    use crate::api::routes::router;
    use crate::api::test_support::{TOKEN, call, state};
    use crate::store::database::Database;
    use crate::triggers::trigger_store::SECRET_PLACEHOLDER;

    #[tokio::test]
    async fn crud_partial_patch_and_a_secret_that_never_comes_back() {
        let dir = std::env::temp_dir().join(format!("nattrail-trig-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let db = Arc::new(Database::open_rw(&dir.join("t.duckdb")).unwrap());
        let app = router(
            state(Arc::clone(&db), None),
            Arc::new(TOKEN.into()),
            std::time::Duration::from_secs(30),
        );
        let (st, t) = call(
            &app,
            Method::POST,
            "/api/v1/triggers",
            Some(json!({"name": "ssh", "url": "https://hooks.example.org/a", "secret": "whsec_c2s=",
                        "filter": {"dst_ports": [22], "sources": ["conntrack"]}, "rate_per_min": 6})),
        )
        .await;
        assert_eq!(st, 201, "{t}");
        assert_eq!(t["secret"], SECRET_PLACEHOLDER);
        let id = t["id"].as_u64().unwrap();
        let path = format!("/api/v1/triggers/{id}");
        let (_, got) = call(&app, Method::GET, &path, None).await;
        assert_eq!(got, t);
        let (_, list) = call(&app, Method::GET, "/api/v1/triggers", None).await;
        assert_eq!(list, json!([t.clone()]));

        // PATCH changes only what was sent; the placeholder sent back keeps the secret.
        let (st, p) = call(
            &app,
            Method::PATCH,
            &path,
            Some(json!({"rate_per_min": 60, "secret": SECRET_PLACEHOLDER})),
        )
        .await;
        assert_eq!(st, 200, "{p}");
        let mut want = t.clone();
        want["rate_per_min"] = json!(60);
        assert_eq!(p, want);
        let stored = triggers::get(&db.connect().unwrap(), &db.secrets(), id).unwrap();
        assert_eq!(stored.secret.as_deref(), Some("whsec_c2s="));

        for (body, status, code) in [
            (json!({"url": "http://[::ffff:127.0.0.1]/"}), 422, "bad_url"),
            (json!({"filter": {"message": "(x"}}), 422, "bad_pattern"),
            (json!({"name": null}), 400, "bad_request"),
            (json!({"colour": "red"}), 400, "bad_json"),
        ] {
            let (st, e) = call(&app, Method::PATCH, &path, Some(body.clone())).await;
            assert_eq!((st, e["error"].as_str()), (status, Some(code)), "{body}");
        }
        let (_, after) = call(&app, Method::GET, &path, None).await;
        assert_eq!(after, want, "refused patches changed nothing");
        let (st, _) = call(&app, Method::POST, &format!("{path}/test"), None).await;
        assert_eq!(st, 409, "no dispatcher in this state");
        let (st, _) = call(&app, Method::DELETE, &path, None).await;
        assert_eq!(st, 204);
        let (st, _) = call(&app, Method::GET, &path, None).await;
        assert_eq!(st, 404);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
