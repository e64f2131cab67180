//! Rules compiled for matching: CEL conditions and data mappings, indexed by
//! (source entity, event type) so an event only meets the rules that name it.
//!
//! Pure code: no actors, no I/O; the profile actor holds a [`RuleSet`].

use std::collections::HashMap;
use std::sync::Arc;

use cel::{Context, Program, Value as CelValue};
use custos_api::limits::{MAX_EXPR_LEN, MAX_MAPPING_DEPTH, MAX_MAPPING_FIELDS};
use custos_api::CloudEvent;
use custos_raft::records::RuleRecord;
use serde_json::{Map, Value};

/// The variables an expression may use.
pub const VARIABLES: [&str; 6] = ["id", "source", "type", "subject", "time", "data"];

/// Why a rule does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    /// Where: `when.condition` or `then.data.<path>`.
    pub field: String,
    /// What, with line and column for CEL syntax errors.
    pub message: String,
}

/// Why a compiled rule could not be evaluated against an event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The condition failed to evaluate (e.g. a missing field).
    #[error("condition: {0}")]
    Condition(String),
    /// The condition did not yield a boolean.
    #[error("condition yielded {0}, not a bool")]
    NotBool(String),
    /// A mapping expression failed.
    #[error("then.data.{path}: {message}")]
    Mapping {
        /// The mapping path.
        path: String,
        /// What failed.
        message: String,
    },
}

/// A compiled mapping: the shape of the command's data, with CEL at the string leaves.
#[derive(Debug)]
enum Mapping {
    Object(Vec<(String, Mapping)>),
    Array(Vec<Mapping>),
    Expr(Box<Program>),
    Constant(Value),
}

/// A rule ready to run.
#[derive(Debug)]
pub struct CompiledRule {
    /// The stored rule.
    pub record: RuleRecord,
    condition: Option<Program>,
    mapping: Mapping,
}

fn compile_expr(field: &str, src: &str) -> Result<Program, RuleError> {
    let err = |message: String| RuleError {
        field: field.to_owned(),
        message,
    };
    if src.trim().is_empty() {
        return Err(err("expression is empty".into()));
    }
    if src.len() > MAX_EXPR_LEN {
        return Err(err(format!("longer than {MAX_EXPR_LEN} bytes")));
    }
    // The CEL parser is third-party code on customer input: contain any panic.
    let parsed = std::panic::catch_unwind(|| Program::compile(src))
        .map_err(|_| err("expression could not be parsed".into()))?;
    let program = parsed.map_err(|e| {
        let first = e.errors.first();
        match first {
            Some(p) => err(format!(
                "syntax error at line {}, column {}: {}",
                p.pos.0, p.pos.1, p.msg
            )),
            None => err(e.to_string()),
        }
    })?;
    for var in program.references().variables() {
        if !VARIABLES.contains(&var) {
            return Err(err(format!(
                "unknown variable '{var}' (use one of {})",
                VARIABLES.join(", ")
            )));
        }
    }
    Ok(program)
}

fn compile_mapping(
    path: &str,
    value: &Value,
    depth: usize,
    fields: &mut usize,
) -> Result<Mapping, RuleError> {
    let field = if path.is_empty() {
        "then.data".to_owned()
    } else {
        format!("then.data.{path}")
    };
    if depth > MAX_MAPPING_DEPTH {
        return Err(RuleError {
            field,
            message: format!("nested deeper than {MAX_MAPPING_DEPTH}"),
        });
    }
    *fields += 1;
    if *fields > MAX_MAPPING_FIELDS {
        return Err(RuleError {
            field,
            message: format!("more than {MAX_MAPPING_FIELDS} fields"),
        });
    }
    Ok(match value {
        Value::String(src) => Mapping::Expr(Box::new(compile_expr(&field, src)?)),
        Value::Object(map) => {
            let mut out = Vec::with_capacity(map.len());
            for (k, v) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                out.push((k.clone(), compile_mapping(&p, v, depth + 1, fields)?));
            }
            Mapping::Object(out)
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, v) in items.iter().enumerate() {
                out.push(compile_mapping(
                    &format!("{path}[{i}]"),
                    v,
                    depth + 1,
                    fields,
                )?);
            }
            Mapping::Array(out)
        }
        other => Mapping::Constant(other.clone()),
    })
}

/// Compiles a stored rule: its condition and every expression of its mapping.
pub fn compile(record: RuleRecord) -> Result<CompiledRule, RuleError> {
    let condition = match &record.condition {
        Some(src) => Some(compile_expr("when.condition", src)?),
        None => None,
    };
    let data: Value = serde_json::from_str(&record.data_json).map_err(|e| RuleError {
        field: "then.data".into(),
        message: e.to_string(),
    })?;
    if !data.is_object() {
        return Err(RuleError {
            field: "then.data".into(),
            message: "must be a JSON object".into(),
        });
    }
    let mut fields = 0;
    let mapping = compile_mapping("", &data, 0, &mut fields)?;
    Ok(CompiledRule {
        record,
        condition,
        mapping,
    })
}

/// Converts JSON to a CEL value; integers that fit are `int`, so arithmetic works as written.
pub fn json_to_cel(v: &Value) -> CelValue {
    match v {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => CelValue::Int(i),
            (None, Some(u)) => CelValue::UInt(u),
            _ => CelValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(map) => {
            let m: HashMap<String, CelValue> = map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_cel(v)))
                .collect();
            CelValue::from(m)
        }
    }
}

/// The variables of one event, built once and shared by every rule it meets.
pub struct EventScope {
    vars: Vec<(&'static str, CelValue)>,
}

impl EventScope {
    /// The CEL variables of `event`.
    pub fn new(event: &CloudEvent) -> Self {
        let s = |v: &str| CelValue::String(Arc::new(v.to_owned()));
        EventScope {
            vars: vec![
                ("id", s(&event.id)),
                ("source", s(&event.source)),
                ("type", s(&event.event_type)),
                ("subject", s(event.subject.as_deref().unwrap_or_default())),
                (
                    "time",
                    event.time.as_deref().map(s).unwrap_or(CelValue::Null),
                ),
                (
                    "data",
                    event
                        .data
                        .as_ref()
                        .map(json_to_cel)
                        .unwrap_or(CelValue::Null),
                ),
            ],
        }
    }

    fn context<'a>(&self, functions: &'a Context<'a>) -> Context<'a> {
        let mut ctx = functions.new_inner_scope();
        for (name, value) in &self.vars {
            ctx.add_variable_from_value(*name, value.clone());
        }
        ctx
    }
}

fn run(program: &Program, ctx: &Context<'_>) -> Result<CelValue, String> {
    // Contain panics from the interpreter on odd input, as in compile.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.execute(ctx))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("expression evaluation failed".into()),
    }
}

fn eval_mapping(path: &str, m: &Mapping, ctx: &Context<'_>) -> Result<Value, EvalError> {
    Ok(match m {
        Mapping::Constant(v) => v.clone(),
        Mapping::Expr(p) => {
            let v = run(p, ctx).map_err(|message| EvalError::Mapping {
                path: path.to_owned(),
                message,
            })?;
            v.json().map_err(|e| EvalError::Mapping {
                path: path.to_owned(),
                message: e.to_string(),
            })?
        }
        Mapping::Object(fields) => {
            let mut out = Map::with_capacity(fields.len());
            for (k, sub) in fields {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                out.insert(k.clone(), eval_mapping(&p, sub, ctx)?);
            }
            Value::Object(out)
        }
        Mapping::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, sub)| eval_mapping(&format!("{path}[{i}]"), sub, ctx))
                .collect::<Result<_, _>>()?,
        ),
    })
}

impl CompiledRule {
    /// Runs the rule on an event: `Ok(None)` when the condition is false, else the
    /// command's data.
    pub fn evaluate(
        &self,
        scope: &EventScope,
        functions: &Context<'_>,
    ) -> Result<Option<Value>, EvalError> {
        let ctx = scope.context(functions);
        if let Some(cond) = &self.condition {
            match run(cond, &ctx).map_err(EvalError::Condition)? {
                CelValue::Bool(true) => {}
                CelValue::Bool(false) => return Ok(None),
                other => return Err(EvalError::NotBool(format!("{other:?}"))),
            }
        }
        eval_mapping("", &self.mapping, &ctx).map(Some)
    }
}

/// A customer's rules, indexed by (source entity, event type).
#[derive(Debug, Default)]
pub struct RuleSet {
    /// source entity -> event type -> rules; nested so lookups borrow `&str` keys.
    by_trigger: HashMap<String, HashMap<String, Vec<CompiledRule>>>,
}

impl RuleSet {
    /// Indexes compiled rules.
    pub fn new(rules: impl IntoIterator<Item = CompiledRule>) -> Self {
        let mut set = RuleSet::default();
        for r in rules {
            set.insert(r);
        }
        set
    }

    /// Adds or replaces a rule.
    pub fn insert(&mut self, rule: CompiledRule) {
        self.remove(&rule.record.id);
        self.by_trigger
            .entry(rule.record.when_entity.clone())
            .or_default()
            .entry(rule.record.when_event_type.clone())
            .or_default()
            .push(rule);
    }

    /// Removes a rule by id.
    pub fn remove(&mut self, rule_id: &str) {
        self.by_trigger.retain(|_, by_type| {
            by_type.retain(|_, rules| {
                rules.retain(|r| r.record.id != rule_id);
                !rules.is_empty()
            });
            !by_type.is_empty()
        });
    }

    /// The rules triggered by (source, event type).
    pub fn matching(&self, source: &str, event_type: &str) -> &[CompiledRule] {
        self.by_trigger
            .get(source)
            .and_then(|by_type| by_type.get(event_type))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// True when any rule names `entity` as trigger or target.
    pub fn names_entity(&self, entity: &str) -> bool {
        self.by_trigger
            .values()
            .flat_map(HashMap::values)
            .flatten()
            .any(|r| r.record.when_entity == entity || r.record.then_entity == entity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: &str, condition: Option<&str>, data: Value) -> RuleRecord {
        RuleRecord {
            id: id.into(),
            name: "n".into(),
            when_entity: "airline".into(),
            when_event_type: "flight.delayed".into(),
            condition: condition.map(str::to_owned),
            then_entity: "hotel".into(),
            then_command_type: "room.hold".into(),
            data_json: data.to_string(),
            created_ms: 0,
        }
    }

    fn event(delay: i64) -> CloudEvent {
        let mut e = CloudEvent::new("e1", "airline", "flight.delayed");
        e.subject = Some("alice-at-airline".into());
        e.data = Some(
            json!({"delay_minutes": delay, "new_arrival": "2026-11-28T22:10:00Z", "flight": "XY123"}),
        );
        e
    }

    #[test]
    fn condition_and_mapping() {
        let rule = compile(record(
            "r1",
            Some("data.delay_minutes > 60"),
            json!({"arrival": "data.new_arrival", "flight": "data.flight",
                   "note": "'late by ' + string(data.delay_minutes)", "nights": 1,
                   "extra": {"by": "source"}}),
        ))
        .expect("compiles");
        let f = Context::default();
        let out = rule
            .evaluate(&EventScope::new(&event(90)), &f)
            .expect("evaluates");
        assert_eq!(
            out,
            Some(json!({"arrival": "2026-11-28T22:10:00Z", "flight": "XY123",
                        "note": "late by 90", "nights": 1, "extra": {"by": "airline"}}))
        );
        assert_eq!(rule.evaluate(&EventScope::new(&event(30)), &f), Ok(None));
    }

    #[test]
    fn compile_errors_name_field_and_position() {
        let e = compile(record("r", Some("data.delay_minutes >"), json!({}))).expect_err("bad");
        assert_eq!(e.field, "when.condition");
        assert!(e.message.contains("line 1"), "{}", e.message);
        let e = compile(record("r", None, json!({"a": {"b": "dta.x"}}))).expect_err("bad var");
        assert_eq!(e.field, "then.data.a.b");
        assert!(e.message.contains("dta"), "{}", e.message);
        let e = compile(record("r", None, json!([1]))).expect_err("not object");
        assert_eq!(e.field, "then.data");
    }

    #[test]
    fn evaluation_errors_are_reported_not_panicked() {
        let rule = compile(record("r", Some("data.missing > 1"), json!({}))).expect("compiles");
        let f = Context::default();
        assert!(matches!(
            rule.evaluate(&EventScope::new(&event(1)), &f),
            Err(EvalError::Condition(_))
        ));
        let rule = compile(record("r", Some("data.flight"), json!({}))).expect("compiles");
        assert!(matches!(
            rule.evaluate(&EventScope::new(&event(1)), &f),
            Err(EvalError::NotBool(_))
        ));
    }

    #[test]
    fn index_by_trigger() {
        let mut set = RuleSet::new([
            compile(record("a", None, json!({}))).expect("a"),
            compile(record("b", None, json!({}))).expect("b"),
        ]);
        let mut other = record("c", None, json!({}));
        other.when_event_type = "flight.cancelled".into();
        set.insert(compile(other).expect("c"));
        assert_eq!(set.matching("airline", "flight.delayed").len(), 2);
        assert_eq!(set.matching("airline", "flight.cancelled").len(), 1);
        assert_eq!(set.matching("hotel", "flight.delayed").len(), 0);
        set.remove("a");
        assert_eq!(set.matching("airline", "flight.delayed").len(), 1);
        assert!(set.names_entity("hotel"));
    }
}
