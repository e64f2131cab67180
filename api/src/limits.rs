//! Bounds on input from outside, shared by the gateway and its clients.

/// Largest event or API request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest identifier (entity id, rule id, event id, subject).
pub const MAX_ID_LEN: usize = 128;
/// Longest human name (entity name, rule name).
pub const MAX_NAME_LEN: usize = 200;
/// Longest URL (command endpoint).
pub const MAX_URL_LEN: usize = 2048;
/// Longest CEL expression in a condition or mapping.
pub const MAX_EXPR_LEN: usize = 4096;
/// Most fields in a rule's data mapping (nested objects count each leaf).
pub const MAX_MAPPING_FIELDS: usize = 64;
/// Deepest nesting of a rule's data mapping.
pub const MAX_MAPPING_DEPTH: usize = 8;
/// Most event or command types one entity declares.
pub const MAX_TYPES_PER_ENTITY: usize = 256;
/// Most rules one customer keeps.
pub const MAX_RULES_PER_CUSTOMER: usize = 1000;
/// Most recommendations one customer keeps dismissed (each is stored, replicated, and read
/// when recommendations are served and the model trained).
pub const MAX_DISMISSALS_PER_CUSTOMER: usize = 1000;
/// Largest JSON Schema accepted for an event or command type, in bytes of JSON.
pub const MAX_SCHEMA_BYTES: usize = 32 * 1024;
/// How far a signature timestamp may be from the node's clock, in seconds.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 5 * 60;
/// Largest page of activity or deliveries returned at once.
pub const MAX_PAGE: usize = 500;
/// Attempts one command may have, replays included: each adds to its record and the activity.
pub const MAX_ATTEMPTS_PER_COMMAND: usize = 64;
/// Bytes of an attempt's error message kept in its record.
pub const MAX_ATTEMPT_ERROR_LEN: usize = 512;

/// The URLs the vault accepts (command endpoints, OAuth endpoints): http(s), a host name or an
/// IPv4 address, an optional port, path and query; no credentials, no fragment. The OpenAPI
/// document states this same pattern, and the server checks it.
pub const URL_PATTERN: &str = r"^https?://(?:[A-Za-z][A-Za-z0-9-]*(?:\.[A-Za-z][A-Za-z0-9-]*)*|(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]))(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?(?:/(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*)?(?:\?(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?$";

/// The identifiers' pattern, as [`is_valid_id`] checks it.
pub const ID_PATTERN: &str = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$";

/// True when `s` is a usable identifier: 1..=MAX_ID_LEN characters from
/// `[A-Za-z0-9._:-]`, so it can be embedded in storage keys and URLs unescaped, and neither
/// `.` nor `..` (clients and browsers resolve those path segments away: such a resource could
/// not be addressed).
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// True when `s` is a usable subject (a customer's id at an entity): printable, no
/// control characters and no NUL (used as a key separator), at most MAX_ID_LEN characters.
pub fn is_valid_subject(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_ID_LEN && !s.chars().any(char::is_control)
}

/// True when `s` is a usable display name: 1..=MAX_NAME_LEN characters, no control
/// characters, and something other than spaces (the OpenAPI document states the same).
pub fn is_valid_name(s: &str) -> bool {
    s.chars().count() <= MAX_NAME_LEN
        && !s.chars().any(char::is_control)
        && s.chars().any(|c| c != ' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("airline-1.example_x:y"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(&"a".repeat(MAX_ID_LEN + 1)));
        assert!(!is_valid_id(".") && !is_valid_id(".."));
        assert!(is_valid_id("...") && is_valid_id(".a") && is_valid_id("..a"));
        assert!(is_valid_subject("Jane Doe <jane@x>"));
        assert!(!is_valid_subject("a\0b"));
    }
}
