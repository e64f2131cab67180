//! The service layer's error, mapped once to RFC 9457 problem+json with a stable code.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use custos_api::problem::PROBLEM_CONTENT_TYPE;
use custos_api::{ErrorCode, Problem};
use custos_raft::StoreError;

/// What a service call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The caller's request cannot be served as sent (4xx), or the node is unavailable (503).
    #[error("{code}: {detail}")]
    Refused {
        /// Stable code.
        code: ErrorCode,
        /// Human detail.
        detail: String,
    },
    /// Storage failed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// Raft failed in a way that is not the caller's fault.
    #[error("raft: {0}")]
    Raft(String),
    /// A background task or actor went away.
    #[error("internal: {0}")]
    Internal(String),
}

impl ServiceError {
    /// A refusal with a code and detail.
    pub fn refused(code: ErrorCode, detail: impl Into<String>) -> Self {
        ServiceError::Refused {
            code,
            detail: detail.into(),
        }
    }

    /// 400 invalid_field naming the field.
    pub fn invalid(field: &str, why: impl std::fmt::Display) -> Self {
        Self::refused(ErrorCode::InvalidField, format!("{field}: {why}"))
    }

    /// 404 not_found.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::refused(ErrorCode::NotFound, format!("{what} {id} not found"))
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        match self {
            ServiceError::Refused { code, detail } => Problem::new(*code, detail.clone()),
            ServiceError::Store(_) | ServiceError::Raft(_) | ServiceError::Internal(_) => {
                Problem::new(
                    ErrorCode::Internal,
                    "the node failed; the request may be retried",
                )
            }
        }
    }
}

impl ResponseError for ServiceError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.problem().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let problem = self.problem();
        if problem.code == ErrorCode::Internal {
            tracing::error!(error = %self, "request failed");
        }
        let mut resp = HttpResponse::build(self.status_code());
        resp.content_type(PROBLEM_CONTENT_TYPE);
        // Overloaded or between leaders: a client that backs off as asked is served in a
        // moment (an election takes one to two seconds with the default timings).
        if matches!(problem.code, ErrorCode::Overloaded | ErrorCode::Unavailable) {
            resp.insert_header((actix_web::http::header::RETRY_AFTER, RETRY_AFTER_SECS));
        }
        resp.json(problem)
    }
}

/// The `Retry-After` of a 429 or 503, in seconds.
const RETRY_AFTER_SECS: u32 = 1;

/// Maps the JSON extractor's errors to problems with stable codes.
pub fn json_error(err: actix_web::error::JsonPayloadError) -> ServiceError {
    use actix_web::error::JsonPayloadError as E;
    match err {
        E::OverflowKnownLength { .. } | E::Overflow { .. } => ServiceError::refused(
            ErrorCode::BodyTooLarge,
            format!("body exceeds {} bytes", custos_api::limits::MAX_BODY_BYTES),
        ),
        E::ContentType => {
            ServiceError::refused(ErrorCode::UnsupportedMediaType, "send application/json")
        }
        E::Deserialize(e) => ServiceError::refused(ErrorCode::MalformedBody, e.to_string()),
        other => ServiceError::refused(ErrorCode::MalformedBody, other.to_string()),
    }
}

/// How long a request's body may take to arrive once its headers have: the server's own
/// timer stops at the headers, and a client trickling a body would hold its connection and
/// buffer for ever.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A body that did not arrive within [`BODY_READ_TIMEOUT`].
pub fn body_too_slow() -> ServiceError {
    ServiceError::refused(
        ErrorCode::MalformedBody,
        format!(
            "the body did not arrive within {} s",
            BODY_READ_TIMEOUT.as_secs()
        ),
    )
}

/// Maps the raw body extractor's errors (events) to problems.
pub fn payload_error(err: actix_web::error::PayloadError) -> ServiceError {
    use actix_web::error::PayloadError as E;
    match err {
        E::Overflow => ServiceError::refused(
            ErrorCode::BodyTooLarge,
            format!("body exceeds {} bytes", custos_api::limits::MAX_BODY_BYTES),
        ),
        other => ServiceError::refused(ErrorCode::MalformedBody, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_leak_details() {
        let e = ServiceError::Internal("secret path /x".into());
        let p = e.problem();
        assert_eq!(p.status, 500);
        assert!(!p.detail.unwrap_or_default().contains("/x"));
        let e = ServiceError::refused(ErrorCode::Unavailable, "no leader");
        assert_eq!(e.status_code(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn overloaded_and_unavailable_say_when_to_retry() {
        let retry_after = |code| {
            ServiceError::refused(code, "x")
                .error_response()
                .headers()
                .get(actix_web::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok().map(str::to_owned))
        };
        assert_eq!(retry_after(ErrorCode::Overloaded).as_deref(), Some("1"));
        assert_eq!(retry_after(ErrorCode::Unavailable).as_deref(), Some("1"));
        assert_eq!(retry_after(ErrorCode::Conflict), None);
    }
}
