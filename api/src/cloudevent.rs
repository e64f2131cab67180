//! CloudEvents 1.0 in structured JSON mode (`application/cloudevents+json`).
//!
//! Events from entities and commands to entities both travel in this envelope.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::limits::{is_valid_id, is_valid_subject, MAX_ID_LEN};

/// Content type of a structured-mode CloudEvent.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Extension attribute on a command naming the event that triggered it.
pub const EXT_CAUSING_EVENT: &str = "custoseventid";
/// Extension attribute on a command naming the entity that sent the triggering event.
pub const EXT_CAUSING_SOURCE: &str = "custoseventsource";
/// Extension attribute on a command naming the rule that produced it.
pub const EXT_RULE: &str = "custosrule";
/// Most extension attributes accepted on an incoming event.
const MAX_EXTENSIONS: usize = 32;
/// Longest extension attribute name accepted (the spec asks for at most 20; longer names are
/// allowed by it, within a bound).
const MAX_EXTENSION_NAME_LEN: usize = 64;
/// Longest extension attribute string value accepted, in bytes: extensions are stored in the
/// customer's activity with the event, so each is bounded, not only the body.
const MAX_EXTENSION_VALUE_BYTES: usize = 2048;

/// A CloudEvents 1.0 event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloudEvent {
    /// Always `"1.0"`.
    #[schema(pattern = r"^1\.0$")]
    pub specversion: String,
    /// Unique per source; the vault deduplicates on (source, id).
    #[schema(pattern = r"^[^\x00]{1,128}$", min_length = 1, max_length = 128)]
    pub id: String,
    /// For events: the sending entity's id. For commands: `custos`.
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub source: String,
    /// The event or command type, e.g. `flight.delayed`.
    #[serde(rename = "type")]
    #[schema(
        pattern = r"^(?:[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}|\.[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,126}|\.\.[A-Za-z0-9._:-]{1,126})$",
        min_length = 1,
        max_length = 128
    )]
    pub event_type: String,
    /// The customer's subject id at the sending (or, for commands, receiving) entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^[^\x00-\x1F\x7F-\x9F]{1,128}$",
        min_length = 1,
        max_length = 128
    )]
    pub subject: Option<String>,
    /// RFC 3339 time of the occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub time: Option<String>,
    /// Media type of `data`; JSON when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^(application/json.*|.*\+json)$")]
    pub datacontenttype: Option<String>,
    /// The payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Extension attributes (CloudEvents 1.0): each name 1 to 64 lower-case letters and
    /// digits, each value a string of at most 2,048 bytes, a boolean, a 32-bit integer or
    /// null; at most 32.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: Map<String, Value>,
}

/// Why an incoming event was refused; the field is named for the error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct EventFieldError {
    /// The offending attribute.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn field_err(field: &'static str, reason: impl Into<String>) -> EventFieldError {
    EventFieldError {
        field,
        reason: reason.into(),
    }
}

impl CloudEvent {
    /// A new event with no subject, time or extensions.
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>) -> Self {
        CloudEvent {
            specversion: "1.0".into(),
            id: id.into(),
            source: source.into(),
            event_type: ty.into(),
            subject: None,
            time: None,
            datacontenttype: None,
            data: None,
            extensions: Map::new(),
        }
    }

    /// Checks what the vault needs of an incoming event: spec version, bounded ids, a
    /// subject, an RFC 3339 time when present, JSON data, few extensions.
    pub fn validate_incoming(&self) -> Result<(), EventFieldError> {
        if self.specversion != "1.0" {
            return Err(field_err("specversion", "must be \"1.0\""));
        }
        // Ids go into the command's `custoseventid`, the customer's activity and the logs:
        // no control characters.
        if self.id.is_empty()
            || self.id.chars().count() > MAX_ID_LEN
            || self.id.chars().any(char::is_control)
        {
            return Err(field_err(
                "id",
                format!("must be 1..={MAX_ID_LEN} characters, none a control character"),
            ));
        }
        if !is_valid_id(&self.source) {
            return Err(field_err("source", "must be a registered entity id"));
        }
        if !is_valid_id(&self.event_type) {
            return Err(field_err(
                "type",
                "must be 1..=128 of [A-Za-z0-9._:-], not . or ..",
            ));
        }
        match &self.subject {
            Some(s) if is_valid_subject(s) => {}
            Some(_) => return Err(field_err("subject", "must be 1..=128 printable bytes")),
            None => {
                return Err(field_err(
                    "subject",
                    "is required: the customer's id at the source",
                ))
            }
        }
        if let Some(t) = &self.time {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|_| field_err("time", "must be RFC 3339"))?;
        }
        if let Some(ct) = &self.datacontenttype {
            if !is_json_media_type(ct) {
                return Err(field_err("datacontenttype", "only JSON data is accepted"));
            }
        }
        if self.extensions.len() > MAX_EXTENSIONS {
            return Err(field_err("extensions", format!("at most {MAX_EXTENSIONS}")));
        }
        if self.extensions.contains_key("data_base64") {
            return Err(field_err("data_base64", "only JSON data is accepted"));
        }
        for (name, value) in &self.extensions {
            check_extension(name, value)?;
        }
        Ok(())
    }
}

/// CloudEvents 1.0: an attribute name MUST be lower-case ASCII letters and digits, and a value
/// one of the type system's (in JSON: a string, a boolean, a 32-bit integer; `null` is the
/// attribute being absent). An object, array or fraction is no attribute value.
fn check_extension(name: &str, value: &Value) -> Result<(), EventFieldError> {
    if name.is_empty()
        || name.len() > MAX_EXTENSION_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(field_err(
            "extensions",
            format!(
                "attribute names must be 1..={MAX_EXTENSION_NAME_LEN} lower-case letters and \
                 digits (CloudEvents 1.0), not {:?}",
                name.chars()
                    .take(MAX_EXTENSION_NAME_LEN)
                    .collect::<String>()
            ),
        ));
    }
    let fits = match value {
        Value::Null | Value::Bool(_) => true,
        Value::String(s) => s.len() <= MAX_EXTENSION_VALUE_BYTES,
        Value::Number(n) => n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
        Value::Array(_) | Value::Object(_) => false,
    };
    if fits {
        Ok(())
    } else {
        Err(field_err(
            "extensions",
            format!(
                "attribute {name}: a value must be a string of at most \
                 {MAX_EXTENSION_VALUE_BYTES} bytes, a boolean or a 32-bit integer"
            ),
        ))
    }
}

/// Whether a content type names JSON: `application/json` or a `+json` suffix, in any case,
/// with or without parameters (RFC 9110: media types are case-insensitive).
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || (essence.contains('/') && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_in_any_case_and_nothing_else() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/cloudevents+json",
            "application/vnd.hotel.hold+JSON ; v=1",
        ] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for bad in [
            "application/jsonfoo",
            "text/plain",
            "+json",
            "application/xml",
            "",
        ] {
            assert!(!is_json_media_type(bad), "{bad}");
        }
    }

    #[test]
    fn an_event_id_with_a_control_character_is_refused() {
        let mut e = CloudEvent::new("evt-1", "airline", "flight.delayed");
        e.subject = Some("FF-1".into());
        assert!(e.validate_incoming().is_ok());
        for id in ["evt\n1", "evt\u{1b}[31m", "evt\u{0}"] {
            e.id = id.into();
            let err = e.validate_incoming().err().map(|e| e.field);
            assert_eq!(err, Some("id"), "{id:?}");
        }
    }

    proptest::proptest! {
        /// Fuzzing (PROPTEST_CASES=100000 for a longer run): no input panics the decoder or
        /// the checks an incoming event goes through.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Ok(e) = serde_json::from_slice::<CloudEvent>(&body) {
                let _ = e.validate_incoming();
            }
        }

        #[test]
        fn arbitrary_events_never_panic(
            id in ".{0,200}",
            source in ".{0,200}",
            ty in ".{0,200}",
            subject in proptest::option::of(".{0,200}"),
            time in proptest::option::of(".{0,64}"),
        ) {
            let mut e = CloudEvent::new(id, source, ty);
            e.subject = subject;
            e.time = time;
            let _ = e.validate_incoming();
            let json = serde_json::to_vec(&e).expect("encodes");
            let back: CloudEvent = serde_json::from_slice(&json).expect("decodes what it encoded");
            proptest::prop_assert_eq!(back, e);
        }
    }

    fn ok_event() -> CloudEvent {
        let mut e = CloudEvent::new("e1", "airline", "flight.delayed");
        e.subject = Some("cust-42".into());
        e.time = Some("2026-11-28T10:00:00Z".into());
        e.data = Some(serde_json::json!({"delay_minutes": 90}));
        e
    }

    #[test]
    fn round_trips_with_extensions() {
        let mut e = ok_event();
        e.extensions.insert("traceparent".into(), "00-abc".into());
        let j = serde_json::to_value(&e).expect("ser");
        assert_eq!(j["type"], "flight.delayed");
        assert_eq!(j["traceparent"], "00-abc");
        let back: CloudEvent = serde_json::from_value(j).expect("de");
        assert_eq!(back, e);
    }

    #[test]
    fn extension_attributes_follow_the_spec() {
        let mut e = ok_event();
        for (name, value) in [
            ("traceparent", serde_json::json!("00-abc")),
            ("sequence", serde_json::json!(42)),
            ("replay", serde_json::json!(true)),
            ("partitionkey", serde_json::Value::Null),
            ("x2", serde_json::json!(-2147483648_i64)),
        ] {
            e.extensions.insert(name.into(), value);
        }
        assert_eq!(e.validate_incoming(), Ok(()));
        for (name, value) in [
            ("traceParent", serde_json::json!("x")),
            ("trace_parent", serde_json::json!("x")),
            ("", serde_json::json!("x")),
            (
                &"a".repeat(MAX_EXTENSION_NAME_LEN + 1),
                serde_json::json!("x"),
            ),
            ("nested", serde_json::json!({"a": 1})),
            ("list", serde_json::json!([1])),
            ("ratio", serde_json::json!(0.5)),
            ("big", serde_json::json!(2147483648_i64)),
            (
                "long",
                serde_json::json!("x".repeat(MAX_EXTENSION_VALUE_BYTES + 1)),
            ),
        ] {
            let mut bad = ok_event();
            bad.extensions.insert(name.to_owned(), value);
            assert_eq!(
                bad.validate_incoming().map_err(|e| e.field),
                Err("extensions"),
                "{name}"
            );
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(ok_event().validate_incoming().is_ok());
        let mut e = ok_event();
        e.specversion = "0.3".into();
        assert_eq!(
            e.validate_incoming().map_err(|e| e.field),
            Err("specversion")
        );
        let mut e = ok_event();
        e.subject = None;
        assert_eq!(e.validate_incoming().map_err(|e| e.field), Err("subject"));
        let mut e = ok_event();
        e.time = Some("yesterday".into());
        assert_eq!(e.validate_incoming().map_err(|e| e.field), Err("time"));
        let mut e = ok_event();
        e.source = "no spaces".into();
        assert_eq!(e.validate_incoming().map_err(|e| e.field), Err("source"));
    }
}
