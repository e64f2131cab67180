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
        HttpResponse::build(self.status_code())
            .content_type(PROBLEM_CONTENT_TYPE)
            .json(problem)
    }
}

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
}
