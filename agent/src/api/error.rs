//! The API's one error shape: `{"error": "...", "detail": "..."}` with the right status.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::query::QueryError;

/// The JSON body of every error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// A short stable code, e.g. "bad_request", "unauthorized", "row_limit".
    pub error: String,
    /// What was wrong, naming the input.
    pub detail: String,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    /// An error with a status, a code and a detail.
    pub fn new(status: StatusCode, error: &str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: error.to_string(),
                detail: detail.into(),
            },
        }
    }

    /// 401.
    pub fn unauthorized(detail: &str) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    /// 500, for failures that are ours.
    pub fn internal(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        let detail = e.to_string();
        match e {
            QueryError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", detail),
            QueryError::ReadOnly(_) => ApiError::new(StatusCode::FORBIDDEN, "read_only", detail),
            QueryError::RowLimit(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "row_limit", detail)
            }
            QueryError::TooLarge(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "result_too_large", detail)
            }
            QueryError::Unavailable(_) | QueryError::Corrupt(_) => ApiError::internal(detail),
            QueryError::Refused(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "query_failed", detail)
            }
            QueryError::Timeout(_) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", detail),
            // DuckDB refusing the user's SQL (unknown column, type mismatch) is their error.
            QueryError::Db { .. } => ApiError::new(StatusCode::BAD_REQUEST, "query_failed", detail),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match &r {
            JsonRejection::JsonSyntaxError(_) | JsonRejection::JsonDataError(_) => {
                StatusCode::BAD_REQUEST
            }
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, "bad_json", r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_query_string", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_path", r.body_text())
    }
}
