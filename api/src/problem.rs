//! RFC 9457 problem details (`application/problem+json`) with a stable `code`.

use serde::{Deserialize, Serialize};

/// Content type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Stable error codes: programs match on these, never on `detail` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not valid JSON or not of the expected shape.
    MalformedBody,
    /// A field is missing, too long, or out of range.
    InvalidField,
    /// The body exceeds the size limit.
    BodyTooLarge,
    /// The content type is not one the route accepts.
    UnsupportedMediaType,
    /// No or a wrong bearer token.
    Unauthorized,
    /// The token is valid but not for this resource.
    Forbidden,
    /// Standard Webhooks headers are missing or malformed.
    MissingSignature,
    /// The signature does not match the body and the entity's secret.
    BadSignature,
    /// The signature timestamp is too old or in the future.
    StaleTimestamp,
    /// The event's source is not a registered entity.
    UnknownEntity,
    /// The resource does not exist.
    NotFound,
    /// The path exists, not with this method (the `Allow` header lists the methods).
    MethodNotAllowed,
    /// The resource already exists.
    Conflict,
    /// The rule does not compile or does not fit the entities' types.
    InvalidRule,
    /// The rule names an entity the customer has not linked.
    EntityNotLinked,
    /// The event or command type is not declared by the entity.
    UnknownType,
    /// The data does not satisfy the type's JSON Schema.
    SchemaViolation,
    /// A count limit was reached (rules per customer, ...).
    LimitReached,
    /// A well-formed URL naming an address the vault may not call (loopback, private,
    /// link-local... unless the operator allows private targets).
    ForbiddenTarget,
    /// An entity's OAuth / OpenID Connect provider cannot be used: its metadata could not be
    /// read, names another issuer, or offers no client authentication the vault can do.
    ProviderUnusable,
    /// The node cannot serve the request right now (no leader, shutting down); retry after
    /// the `Retry-After` seconds.
    Unavailable,
    /// Too much is queued for the group right now; retry after the `Retry-After` seconds.
    Overloaded,
    /// Something failed inside the node; the request may be retried.
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code is answered with.
    pub fn status(self) -> u16 {
        use ErrorCode::*;
        match self {
            // 400: the request does not match the documented schema; 422: it does, but what
            // it says cannot be done (a rule that does not compile, a type the entity lacks...).
            MalformedBody | InvalidField | MissingSignature => 400,
            Unauthorized | BadSignature | StaleTimestamp => 401,
            Forbidden => 403,
            NotFound => 404,
            MethodNotAllowed => 405,
            Conflict => 409,
            BodyTooLarge => 413,
            UnsupportedMediaType => 415,
            InvalidRule | UnknownType | SchemaViolation | EntityNotLinked | UnknownEntity
            | LimitReached | ForbiddenTarget | ProviderUnusable => 422,
            Unavailable => 503,
            Overloaded => 429,
            Internal => 500,
        }
    }

    /// The snake_case name used in `code` and in the `type` URI.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MalformedBody => "malformed_body",
            InvalidField => "invalid_field",
            BodyTooLarge => "body_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            Unauthorized => "unauthorized",
            Forbidden => "forbidden",
            MissingSignature => "missing_signature",
            BadSignature => "bad_signature",
            StaleTimestamp => "stale_timestamp",
            UnknownEntity => "unknown_entity",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            Conflict => "conflict",
            InvalidRule => "invalid_rule",
            EntityNotLinked => "entity_not_linked",
            UnknownType => "unknown_type",
            SchemaViolation => "schema_violation",
            LimitReached => "limit_reached",
            ForbiddenTarget => "forbidden_target",
            ProviderUnusable => "provider_unusable",
            Unavailable => "unavailable",
            Overloaded => "overloaded",
            Internal => "internal",
        }
    }

    fn title(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MalformedBody => "Malformed request body",
            InvalidField => "Invalid field",
            BodyTooLarge => "Request body too large",
            UnsupportedMediaType => "Unsupported media type",
            Unauthorized => "Unauthorized",
            Forbidden => "Forbidden",
            MissingSignature => "Missing webhook signature",
            BadSignature => "Bad webhook signature",
            StaleTimestamp => "Stale webhook timestamp",
            UnknownEntity => "Unknown entity",
            NotFound => "Not found",
            MethodNotAllowed => "Method not allowed",
            Conflict => "Conflict",
            InvalidRule => "Invalid rule",
            EntityNotLinked => "Entity not linked",
            UnknownType => "Unknown type",
            SchemaViolation => "Schema violation",
            LimitReached => "Limit reached",
            ForbiddenTarget => "Forbidden target address",
            ProviderUnusable => "OAuth provider unusable",
            Unavailable => "Service unavailable",
            Overloaded => "Too many requests",
            Internal => "Internal error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`urn:custos:problem:<code>`).
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short human summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// Human explanation of this occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The stable machine-readable code.
    pub code: ErrorCode,
}

impl Problem {
    /// A problem for `code` with a human `detail`.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Problem {
            type_uri: format!("urn:custos:problem:{}", code.as_str()),
            title: code.title().to_owned(),
            status: code.status(),
            detail: Some(detail.into()),
            code,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code, self.status)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_round_trips_with_stable_code() {
        let p = Problem::new(ErrorCode::BadSignature, "nope");
        let j = serde_json::to_value(&p).expect("serialize");
        assert_eq!(j["code"], "bad_signature");
        assert_eq!(j["status"], 401);
        assert_eq!(j["type"], "urn:custos:problem:bad_signature");
        let back: Problem = serde_json::from_value(j).expect("deserialize");
        assert_eq!(back, p);
    }
}
