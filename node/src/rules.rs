//! Rules compiled for matching: CEL conditions and data mappings, indexed by
//! (source entity, event type) so an event only meets the rules that name it.
//!
//! Pure code: no actors, no I/O; the profile actor holds a [`RuleSet`].

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{ComprehensionExpr, EntryExpr, Expr, IdedEntryExpr};
use cel::common::value::CelVal;
use cel::extractors::This;
use cel::{Context, ExecutionError, FunctionContext, IdedExpr, Program, Value as CelValue};
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
    /// The condition did not yield a boolean: what it yielded, as JSON.
    #[error("condition yielded {0}, not true or false")]
    NotBool(String),
    /// The rule would cost more than the budget on this event (estimated before running).
    #[error(
        "not evaluated: it could cost {estimate} steps on this event, over the budget of {budget}"
    )]
    OverBudget {
        /// The estimate.
        estimate: u64,
        /// The budget.
        budget: u64,
    },
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
    Expr(Arc<Program>),
    Constant(Value),
}

/// A rule ready to run.
#[derive(Debug)]
pub struct CompiledRule {
    /// The stored rule.
    pub record: RuleRecord,
    /// What its texts compile to, shared by every rule with the same texts.
    body: Arc<RuleBody>,
}

/// What a rule's condition and data compile to: it depends on those two texts only.
#[derive(Debug)]
struct RuleBody {
    condition: Option<Arc<Program>>,
    mapping: Mapping,
    /// The longest collection or string in an event this rule stays within the budget for.
    max_collection: u64,
}

// ---- cost bounds --------------------------------------------------------------------------
//
// CEL written by customers runs on the vault's threads, and the interpreter has no step
// counter. So every expression is bounded before it runs: its shape when it is saved (depth,
// size, comprehensions nested), and its cost on each event, estimated from the expression and
// the largest collection or string in the event. The estimate is an upper bound of the
// interpreter's work (one unit per node evaluated, plus one per element copied or scanned by
// `+`, `in`, `contains`, `matches`...): a rule whose estimate is over the budget is not run.

/// Operator characters allowed in one expression, counted before parsing: the parser
/// recurses per operator, so this bounds its stack whatever the input.
pub const MAX_OPERATORS: usize = 256;
/// Brackets (`(`, `[`, `{`) open at once, counted before parsing: the parser recurses
/// through a dozen grammar rules per bracket.
pub const MAX_BRACKETS: usize = 24;
/// The deepest expression tree (evaluation recurses once per level).
pub const MAX_EXPR_DEPTH: usize = 48;
/// The most comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) nested in one another.
pub const MAX_COMPREHENSION_NESTING: usize = 2;
/// Cost units one rule may spend on one event (condition and mapping together): a few tens
/// of milliseconds of interpreter work at most.
pub const EVAL_BUDGET: u64 = 10_000_000;
/// What one call of `matches` is priced at besides its operands: the interpreter compiles
/// the regular expression on every call.
const MATCHES_COMPILE_COST: u64 = 10_000;
/// The collection size a rule is priced at when saved: a rule over the budget even on small
/// events is refused then, with the reason.
pub const SAVE_TIME_COLLECTION: u64 = 100;

/// Counts operator characters, a bound on the parser's recursion.
fn operator_count(src: &str) -> usize {
    src.bytes()
        .filter(|b| b"+-*/%<>=!&|?:.[({,".contains(b))
        .count()
}

/// The most brackets open at once in the source (strings included: a bound, not a parse).
fn bracket_depth(src: &str) -> usize {
    let (mut open, mut deepest) = (0usize, 0usize);
    for b in src.bytes() {
        match b {
            b'(' | b'[' | b'{' => {
                open += 1;
                deepest = deepest.max(open);
            }
            b')' | b']' | b'}' => open = open.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The depth of an expression tree, walked without recursion (it is not yet bounded).
fn depth(root: &IdedExpr) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((e, d)) = stack.pop() {
        deepest = deepest.max(d);
        for child in children(e) {
            stack.push((child, d + 1));
        }
    }
    deepest
}

fn children(e: &IdedExpr) -> Vec<&IdedExpr> {
    match &e.expr {
        Expr::Call(c) => c
            .target
            .as_deref()
            .into_iter()
            .chain(c.args.iter())
            .collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(l) => l.elements.iter().collect(),
        Expr::Map(m) => m.entries.iter().flat_map(entry_children).collect(),
        Expr::Struct(s) => s.entries.iter().flat_map(entry_children).collect(),
        Expr::Select(s) => vec![&s.operand],
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => vec![],
    }
}

fn entry_children(e: &IdedEntryExpr) -> Vec<&IdedExpr> {
    match &e.expr {
        EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
        EntryExpr::StructField(f) => vec![&f.value],
    }
}

/// The variables comprehensions bind (`x` in `data.items.exists(x, ...)`).
fn bound_variables(root: &IdedExpr) -> Vec<&str> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(e) = stack.pop() {
        if let Expr::Comprehension(c) = &e.expr {
            out.push(c.iter_var.as_str());
            out.extend(c.iter_var2.as_deref());
            out.push(c.accu_var.as_str());
        }
        stack.extend(children(e));
    }
    out
}

/// Comprehensions nested in one another (a comprehension's range is not inside it).
fn nesting(e: &IdedExpr) -> usize {
    match &e.expr {
        Expr::Comprehension(c) => {
            let body = [&c.accu_init, &c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .map(nesting)
                .max()
                .unwrap_or(0);
            nesting(&c.iter_range).max(1 + body)
        }
        _ => children(e).into_iter().map(nesting).max().unwrap_or(0),
    }
}

/// Bounds on a value an expression yields, given that no collection or string in the event is
/// longer than `n`: its own length (a string's bytes, a list's or map's entries), the length
/// of anything inside it, at any depth, and how many values it holds, at every depth, each
/// copy counted (what comparing it walks). A value made in the expression can be longer than
/// anything in the event (`x + x` in a `map` doubles each element, and a `map` of that doubles
/// again), so every bound variable carries the bound of what it holds: a bound that took every
/// variable to be no longer than the event's longest let a chain of such maps grow a string
/// past any memory while priced as linear. And a list of five copies of the element, mapped
/// fifteen times over, holds 5^15 values while its length stays 1: comparing two of them was
/// priced by their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size {
    /// Its own length.
    len: u64,
    /// The longest length of anything inside it.
    inner: u64,
    /// The values it holds, itself included, each copy counted.
    nodes: u64,
}

impl Size {
    /// A number, boolean, null, timestamp or duration.
    const SCALAR: Size = Size {
        len: 1,
        inner: 0,
        nodes: 1,
    };

    /// What the event's variables hold.
    fn event(n: EventBound) -> Size {
        Size {
            len: n.longest,
            inner: n.longest,
            nodes: n.values,
        }
    }

    /// A string (or bytes) of `len` bytes.
    fn text(len: u64) -> Size {
        Size {
            len,
            inner: 0,
            nodes: 1,
        }
    }

    /// Priced out of any budget.
    const HUGE: Size = Size {
        len: u64::MAX / 4,
        inner: u64::MAX / 4,
        nodes: u64::MAX / 4,
    };

    /// The longest of its own length and its contents'.
    fn whole(self) -> u64 {
        self.len.max(self.inner)
    }

    /// One of its elements (or keys, fields, values): no longer than its contents, holding
    /// no more values than it.
    fn element(self) -> Size {
        Size {
            len: self.inner,
            inner: self.inner,
            nodes: self.nodes,
        }
    }

    /// Either of two values.
    fn either(self, other: Size) -> Size {
        Size {
            len: self.len.max(other.len),
            inner: self.inner.max(other.inner),
            nodes: self.nodes.max(other.nodes),
        }
    }

    /// A collection holding values of these sizes.
    fn holding(count: usize, items: &[Size]) -> Size {
        Size {
            len: count as u64,
            inner: items.iter().map(|i| i.whole()).max().unwrap_or(0),
            nodes: items.iter().map(|i| i.nodes).fold(1, u64::saturating_add),
        }
    }
}

/// What an event is priced by: its longest list, map or string, and how many values it holds
/// at every depth (a list of 350 lists of 350 numbers is 350 long and holds 122,850: comparing
/// two such lists walks every one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBound {
    /// The longest list, map or string.
    longest: u64,
    /// The values it holds.
    values: u64,
}

impl EventBound {
    /// An event whose values are no more than its longest collection (what a rule is priced
    /// at when saved, and bisected over).
    fn flat(longest: u64) -> Self {
        EventBound {
            longest,
            values: longest,
        }
    }
}

/// The comprehension variables in scope, innermost last, with the bound of what each holds.
type Bound<'a> = Vec<(&'a str, Size)>;

/// Functions whose result is a number, boolean, timestamp or duration, whatever their
/// operands (the interpreter's standard functions and the operators).
fn yields_scalar(func: &str) -> bool {
    matches!(
        func,
        "_==_"
            | "_!=_"
            | "_<_"
            | "_<=_"
            | "_>_"
            | "_>=_"
            | "_-_"
            | "_*_"
            | "_/_"
            | "_%_"
            | "-_"
            | "!_"
            | "_&&_"
            | "_||_"
            | "@in"
            | "@not_strictly_false"
            | "has"
            | "size"
            | "contains"
            | "startsWith"
            | "endsWith"
            | "matches"
            | "int"
            | "uint"
            | "double"
            | "duration"
            | "timestamp"
    ) || func.starts_with("get")
}

/// Functions that may walk their operands whole, every value inside them (equality and
/// order compare element by element, at every depth): they cost the values their operands
/// hold, not their length.
fn walks_operands(func: &str) -> bool {
    matches!(
        func,
        "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" | "@in" | "contains" | "max" | "min"
    )
}

/// The longest text `string()` makes of a number (Rust writes a double without an exponent:
/// `string(5e-324)` is 326 bytes) or a time.
const LONGEST_NUMBER_TEXT: u64 = 330;

/// Bounds on what `e` yields, given that no collection or string in the event is longer than
/// `n` and what the comprehension variables in `scope` hold.
fn size<'a>(e: &'a IdedExpr, n: EventBound, scope: &mut Bound<'a>) -> Size {
    match &e.expr {
        Expr::Literal(CelVal::String(s)) => Size::text(s.len() as u64),
        Expr::Literal(CelVal::Bytes(b)) => Size::text(b.len() as u64),
        Expr::Literal(_) | Expr::Unspecified => Size::SCALAR,
        Expr::Ident(name) => scope
            .iter()
            .rev()
            .find(|(v, _)| v == name)
            .map_or(Size::event(n), |(_, s)| *s),
        Expr::Select(s) if s.test => Size::SCALAR,
        Expr::Select(s) => size(&s.operand, n, scope).element(),
        Expr::List(l) => {
            let items: Vec<Size> = l.elements.iter().map(|i| size(i, n, scope)).collect();
            Size::holding(items.len(), &items)
        }
        Expr::Map(m) => entries_size(&m.entries, n, scope),
        Expr::Struct(st) => entries_size(&st.entries, n, scope),
        Expr::Call(c) => {
            let operands: Vec<Size> = c
                .target
                .as_deref()
                .into_iter()
                .chain(c.args.iter())
                .map(|o| size(o, n, scope))
                .collect();
            match c.func_name.as_str() {
                f if yields_scalar(f) => Size::SCALAR,
                "_?_:_" => operands
                    .iter()
                    .skip(1)
                    .copied()
                    .reduce(Size::either)
                    .unwrap_or(Size::SCALAR),
                "_[_]" => operands.first().map_or(Size::SCALAR, |o| o.element()),
                // One of the operands, or an element of the one list given.
                "max" | "min" => operands
                    .iter()
                    .map(|o| o.either(o.element()))
                    .reduce(Size::either)
                    .unwrap_or(Size::SCALAR),
                // A string as long as the operand (bytes that are not UTF-8 become three
                // bytes each), or a number's or a time's text.
                "string" | "bytes" => Size::text(
                    operands
                        .iter()
                        .map(|o| o.len.saturating_mul(3))
                        .max()
                        .unwrap_or(0)
                        .max(LONGEST_NUMBER_TEXT),
                ),
                // `+` and anything else: as long as its operands together.
                _ => Size {
                    len: operands.iter().map(|o| o.len).fold(0, u64::saturating_add),
                    inner: operands.iter().map(|o| o.inner).max().unwrap_or(0),
                    nodes: operands
                        .iter()
                        .map(|o| o.nodes)
                        .fold(0, u64::saturating_add),
                },
            }
        }
        Expr::Comprehension(c) => {
            let range = size(&c.iter_range, n, scope);
            let init = size(&c.accu_init, n, scope);
            let before = scope.len();
            bind_elements(c, range, scope);
            let accu = accumulated(c, range, init, n, scope);
            scope.push((c.accu_var.as_str(), accu));
            let out = size(&c.result, n, scope);
            scope.truncate(before);
            out
        }
    }
}

/// Bounds on a map (or message) made of `entries`.
fn entries_size<'a>(entries: &'a [IdedEntryExpr], n: EventBound, scope: &mut Bound<'a>) -> Size {
    let items: Vec<Size> = entries
        .iter()
        .flat_map(entry_children)
        .map(|i| size(i, n, scope))
        .collect();
    Size::holding(entries.len(), &items)
}

/// Binds a comprehension's variables to an element of its range (and a key or index).
fn bind_elements<'a>(c: &'a ComprehensionExpr, range: Size, scope: &mut Bound<'a>) {
    scope.push((c.iter_var.as_str(), range.element()));
    if let Some(v) = c.iter_var2.as_deref() {
        scope.push((v, range.element().either(Size::SCALAR)));
    }
}

/// Bounds on a comprehension's accumulator after its last step, its variables bound in
/// `scope`. Each step is measured twice, after an empty accumulator and a long one: a step
/// that does not grow with it (`all`, `exists`) yields at most what it yields once; a step
/// that adds to it (`map`, `filter`: `@result + [x]`) adds as much each time, over the
/// range's length. A step that adds the accumulator to itself (which no macro writes) is
/// priced out of any budget.
fn accumulated<'a>(
    c: &'a ComprehensionExpr,
    range: Size,
    init: Size,
    n: EventBound,
    scope: &mut Bound<'a>,
) -> Size {
    const PROBE: u64 = 1 << 20;
    let step_after = |len: u64, scope: &mut Bound<'a>| {
        scope.push((
            c.accu_var.as_str(),
            Size {
                len,
                inner: init.inner,
                nodes: len,
            },
        ));
        let out = size(&c.loop_step, n, scope);
        scope.pop();
        out
    };
    let once = step_after(0, scope);
    let after_long = step_after(PROBE, scope);
    if after_long.len <= once.len && after_long.nodes <= once.nodes {
        return init.either(once);
    }
    let added = after_long.len.saturating_sub(PROBE);
    let added_nodes = after_long.nodes.saturating_sub(PROBE);
    if added > once.len || added_nodes > once.nodes {
        return Size::HUGE;
    }
    Size {
        len: init.len.saturating_add(range.len.saturating_mul(added)),
        inner: init.inner.max(once.inner),
        nodes: init
            .nodes
            .saturating_add(range.len.saturating_mul(added_nodes)),
    }
}

/// An upper bound of the interpreter's work for `e`, given that no collection or string in
/// the event is longer than `n` and what the comprehension variables in `scope` hold.
fn cost<'a>(e: &'a IdedExpr, n: EventBound, scope: &mut Bound<'a>) -> u64 {
    match &e.expr {
        Expr::Comprehension(c) => {
            let range = size(&c.iter_range, n, scope);
            let init = size(&c.accu_init, n, scope);
            let outside =
                cost(&c.iter_range, n, scope).saturating_add(cost(&c.accu_init, n, scope));
            let before = scope.len();
            bind_elements(c, range, scope);
            // Every step is priced with the accumulator at its longest.
            let accu = accumulated(c, range, init, n, scope);
            scope.push((c.accu_var.as_str(), accu));
            let per_element =
                cost(&c.loop_cond, n, scope).saturating_add(cost(&c.loop_step, n, scope));
            let result = cost(&c.result, n, scope);
            scope.truncate(before);
            outside
                .saturating_add(range.len.saturating_mul(per_element))
                .saturating_add(result)
        }
        Expr::Call(call) => {
            let operands: Vec<&IdedExpr> = call
                .target
                .as_deref()
                .into_iter()
                .chain(call.args.iter())
                .collect();
            // Only these take constant time whatever their operands' length; any other
            // function may copy or scan its operands (`+`, `in`, `contains`, `max` and `min` of
            // a list, a comparison or conversion of strings), so it costs their length.
            let constant = matches!(
                call.func_name.as_str(),
                "_-_"
                    | "_*_"
                    | "_/_"
                    | "_%_"
                    | "-_"
                    | "!_"
                    | "_&&_"
                    | "_||_"
                    | "_?_:_"
                    | "_[_]"
                    | "size"
                    | "has"
                    | "@not_strictly_false"
            );
            // A comparison with a number, a boolean or null is decided at once (CEL does
            // not compare across types), whatever the other operand holds.
            let with_scalar = matches!(
                call.func_name.as_str(),
                "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_"
            ) && operands.iter().any(|o| {
                matches!(
                    &o.expr,
                    Expr::Literal(
                        CelVal::Int(_)
                            | CelVal::UInt(_)
                            | CelVal::Double(_)
                            | CelVal::Boolean(_)
                            | CelVal::Null
                    )
                )
            });
            let scans = !constant && !with_scalar;
            let walks = walks_operands(call.func_name.as_str());
            // `matches` compiles its pattern on every call: a compile is priced at ten
            // thousand steps, so a pattern in a loop over a large list is refused.
            let mut total = if call.func_name == "matches" {
                MATCHES_COMPILE_COST
            } else {
                1u64
            };
            for o in operands {
                total = total.saturating_add(cost(o, n, scope));
                if scans {
                    let o = size(o, n, scope);
                    total = total.saturating_add(if walks { o.nodes.max(o.len) } else { o.len });
                }
            }
            total
        }
        // `has()` looks for the field among every key of the map.
        Expr::Select(sel) if sel.test => 1u64
            .saturating_add(cost(&sel.operand, n, scope))
            .saturating_add(size(&sel.operand, n, scope).len),
        _ => children(e)
            .into_iter()
            .map(|c| cost(c, n, scope))
            .fold(1u64, u64::saturating_add),
    }
}

fn mapping_programs<'a>(m: &'a Mapping, out: &mut Vec<&'a Program>) {
    match m {
        Mapping::Expr(p) => out.push(p),
        Mapping::Object(fields) => fields.iter().for_each(|(_, f)| mapping_programs(f, out)),
        Mapping::Array(items) => items.iter().for_each(|i| mapping_programs(i, out)),
        Mapping::Constant(_) => {}
    }
}

/// The cost of all of a rule's expressions on an event whose collections are at most `n` long.
fn rule_cost(programs: &[&Program], n: EventBound) -> u64 {
    programs
        .iter()
        .map(|p| cost(p.expression(), n, &mut Vec::new()))
        .fold(0, u64::saturating_add)
}

/// The longest list, map or string anywhere in `v` (at least 1), and how many values it
/// holds, itself included.
fn measure(v: &Value) -> (u64, u64) {
    let mut largest = 1u64;
    let mut values = 0u64;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        values += 1;
        match v {
            Value::String(s) => largest = largest.max(s.len() as u64),
            Value::Array(items) => {
                largest = largest.max(items.len() as u64);
                stack.extend(items.iter());
            }
            Value::Object(map) => {
                largest = largest.max(map.len() as u64);
                for (k, v) in map {
                    largest = largest.max(k.len() as u64);
                    stack.push(v);
                }
            }
            _ => {}
        }
    }
    (largest, values)
}

/// Expressions parsed lately, by source text, shared by every profile: customers of one
/// template or recommendation keep the same texts, and CEL's parser costs far more than the
/// lookup (11% of a node's CPU on cold profiles, with only the triggered rules compiled).
static PARSED: SharedCache<String, Program> = SharedCache::new(2048);

/// Checks and parses one expression, or takes it from [`PARSED`]: a text passes or fails the
/// checks below the same way every time, so only the ones that passed are kept.
fn compile_expr(field: &str, src: &str) -> Result<Arc<Program>, RuleError> {
    PARSED.get_or_try_insert(src, || parse_expr(field, src))
}

fn parse_expr(field: &str, src: &str) -> Result<Program, RuleError> {
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
    if operator_count(src) > MAX_OPERATORS {
        return Err(err(format!(
            "more than {MAX_OPERATORS} operators, calls and field selections"
        )));
    }
    if bracket_depth(src) > MAX_BRACKETS {
        return Err(err(format!("more than {MAX_BRACKETS} brackets nested")));
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
    let root = program.expression();
    // After the lexical bounds, the tree's own (bracket-free chains are deep too).
    if depth(root) > MAX_EXPR_DEPTH {
        return Err(err(format!("nested deeper than {MAX_EXPR_DEPTH}")));
    }
    if nesting(root) > MAX_COMPREHENSION_NESTING {
        return Err(err(format!(
            "more than {MAX_COMPREHENSION_NESTING} comprehensions (all, exists, map, filter) nested"
        )));
    }
    let bound = bound_variables(root);
    for var in program.references().variables() {
        if !VARIABLES.contains(&var) && !bound.contains(&var) {
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
        Value::String(src) => Mapping::Expr(compile_expr(&field, src)?),
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

/// CEL's standard functions, one registry for every profile: building it (a map of about 25
/// boxed functions) per rebuilt profile cost about 1% of a node's CPU on cold profiles, and
/// memory per loaded profile.
pub fn functions() -> &'static Context<'static> {
    static FUNCTIONS: std::sync::LazyLock<Context<'static>> = std::sync::LazyLock::new(|| {
        let mut ctx = Context::default();
        let conversions: [(&str, Conversion); 4] = [
            ("string", cel::functions::string),
            ("int", cel::functions::int),
            ("uint", cel::functions::uint),
            ("double", cel::functions::double),
        ];
        for (name, convert) in conversions {
            ctx.add_function(name, move |ftx: &FunctionContext, v: This<CelValue>| {
                refusing_collections(ftx, v, convert)
            });
        }
        ctx
    });
    &FUNCTIONS
}

/// CEL's conversions refuse a list or a map by its type: the interpreter's own put the whole
/// value into their error as Rust debug text, so `string([data, data, ...])` (a list of a few
/// pointers) wrote out every copy of the event's data.
fn convertible(ftx: &FunctionContext, v: &CelValue) -> Result<(), ExecutionError> {
    match v {
        CelValue::List(_) | CelValue::Map(_) | CelValue::Function(..) => {
            Err(ftx.error(format!("cannot convert {} to {}", kind(v), ftx.name)))
        }
        _ => Ok(()),
    }
}

/// A CEL conversion, refusing a list or map first.
type Conversion = fn(&FunctionContext, This<CelValue>) -> Result<CelValue, ExecutionError>;

fn refusing_collections(
    ftx: &FunctionContext,
    This(v): This<CelValue>,
    convert: Conversion,
) -> Result<CelValue, ExecutionError> {
    convertible(ftx, &v)?;
    convert(ftx, This(v))
}

/// Rule bodies compiled lately, by their texts (condition, data), shared by every profile:
/// customers of one template keep the same texts, and a cold profile compiles the rule its
/// event triggers, whose cost bound alone is a bisection of about 24 estimates. Everything in a
/// body depends on those two texts alone (the field names in its errors included).
static COMPILED: SharedCache<RuleTexts, RuleBody> = SharedCache::new(1024);
/// A rule's condition and data, as stored.
type RuleTexts = (Option<String>, String);

/// Compiles a stored rule: its condition and every expression of its mapping, or takes them
/// from [`COMPILED`].
pub fn compile(mut record: RuleRecord) -> Result<CompiledRule, RuleError> {
    // The texts are lent to the lookup and given back, so a hit copies nothing.
    let texts: RuleTexts = (
        record.condition.take(),
        std::mem::take(&mut record.data_json),
    );
    let body = COMPILED.get_or_try_insert(&texts, || compile_body(&texts));
    (record.condition, record.data_json) = texts;
    Ok(CompiledRule {
        record,
        body: body?,
    })
}

/// A map of values made from keys, shared by every profile and bounded by `capacity` entries
/// (emptied when full: the texts it holds repeat across customers, so the few made again after
/// a clear cost less than tracking recency on every hit). Only values that were made are kept:
/// making one is deterministic in its key, so a key that failed fails the same way again.
struct SharedCache<K, V> {
    entries: std::sync::LazyLock<std::sync::Mutex<HashMap<K, Arc<V>>>>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq, V> SharedCache<K, V> {
    const fn new(capacity: usize) -> Self {
        Self {
            entries: std::sync::LazyLock::new(Default::default),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<V>>> {
        // A panic elsewhere cannot leave the map half-written: every change is one call.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value for `key`, made by `make` (outside the lock) when it is not held.
    fn get_or_try_insert<Q, E>(
        &self,
        key: &Q,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(value) = self.lock().get(key).cloned() {
            return Ok(value);
        }
        let value = Arc::new(make()?);
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(key.to_owned(), value.clone());
        Ok(value)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

fn compile_body((condition, data_json): &RuleTexts) -> Result<RuleBody, RuleError> {
    let condition = match condition {
        Some(src) => Some(compile_expr("when.condition", src)?),
        None => None,
    };
    if let Some(kind) = condition.as_ref().and_then(|c| never_bool(c.expression())) {
        return Err(RuleError {
            field: "when.condition".into(),
            message: format!("yields {kind}, not true or false (compare it, e.g. `... > 0`)"),
        });
    }
    let data: Value = serde_json::from_str(data_json).map_err(|e| RuleError {
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
    let mut programs: Vec<&Program> = condition.iter().map(Arc::as_ref).collect();
    mapping_programs(&mapping, &mut programs);
    let at_save = rule_cost(&programs, EventBound::flat(SAVE_TIME_COLLECTION));
    if at_save > EVAL_BUDGET {
        return Err(RuleError {
            field: if condition.is_some() {
                "when.condition".into()
            } else {
                "then.data".into()
            },
            message: format!(
                "too costly: up to {at_save} steps on an event with {SAVE_TIME_COLLECTION}-element \
                 lists, over the budget of {EVAL_BUDGET}"
            ),
        });
    }
    // The largest event this rule can run on: cost grows with n, so bisect.
    let (mut lo, mut hi) = (SAVE_TIME_COLLECTION, 1u64 << 24);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if rule_cost(&programs, EventBound::flat(mid)) <= EVAL_BUDGET {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let max_collection = lo;
    Ok(RuleBody {
        condition,
        mapping,
        max_collection,
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
    /// What a rule's cost is priced at: the longest collection or string in the event, and
    /// the values it holds.
    bound: EventBound,
}

impl EventScope {
    /// The CEL variables of `event`.
    pub fn new(event: &CloudEvent) -> Self {
        let s = |v: &str| CelValue::String(Arc::new(v.to_owned()));
        let (in_data, values) = event.data.as_ref().map_or((1, 1), measure);
        let largest = [
            event.id.len(),
            event.source.len(),
            event.event_type.len(),
            event.subject.as_deref().map_or(0, str::len),
            event.time.as_deref().map_or(0, str::len),
        ]
        .into_iter()
        .map(|l| l as u64)
        .chain([in_data])
        .max()
        .unwrap_or(1);
        EventScope {
            bound: EventBound {
                longest: largest,
                values: values.max(largest),
            },
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

// ---- values and errors as customers read them ---------------------------------------------

/// The longest value quoted in a reason.
const MAX_SHOWN: usize = 80;

/// A CEL value's type, as a reason names it.
fn kind(v: &CelValue) -> &'static str {
    match v {
        CelValue::Null => "null",
        CelValue::Int(_) => "an int",
        CelValue::UInt(_) => "a uint",
        CelValue::Float(_) => "a double",
        CelValue::String(_) => "a string",
        CelValue::Bytes(_) => "bytes",
        CelValue::Bool(_) => "a bool",
        CelValue::List(_) => "a list",
        CelValue::Map(_) => "a map",
        CelValue::Timestamp(_) => "a timestamp",
        CelValue::Duration(_) => "a duration",
        CelValue::Function(..) => "a value",
    }
}

/// Why a CEL value is not turned into JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unfit {
    /// Its JSON would be longer than allowed.
    TooLong,
    /// It holds something JSON cannot (a function, a duration past 2^63 ns).
    NotJson,
}

/// A CEL value as JSON, in at most about `budget` bytes of JSON text (each string's bytes,
/// and one per value, key and element). The interpreter shares values: a list of a hundred
/// references to the event's data is a hundred pointers to it, and its JSON a hundred copies,
/// so the copy is bounded as it is made, not measured after (cel's own `json()` made it whole:
/// a rule's data could ask for gigabytes).
fn to_json_within(v: &CelValue, budget: &mut usize) -> Result<Value, Unfit> {
    fn spend(budget: &mut usize, bytes: usize) -> Result<(), Unfit> {
        *budget = budget.checked_sub(bytes.max(1)).ok_or(Unfit::TooLong)?;
        Ok(())
    }
    Ok(match v {
        CelValue::List(items) => {
            spend(budget, items.len())?;
            let mut out = Vec::with_capacity(items.len());
            for item in items.iter() {
                out.push(to_json_within(item, budget)?);
            }
            Value::Array(out)
        }
        CelValue::Map(map) => {
            spend(budget, map.map.len())?;
            let mut out = Map::with_capacity(map.map.len());
            for (k, item) in map.map.iter() {
                let key = k.to_string();
                spend(budget, key.len())?;
                out.insert(key, to_json_within(item, budget)?);
            }
            Value::Object(out)
        }
        CelValue::String(text) => {
            spend(budget, text.len())?;
            Value::String(text.to_string())
        }
        CelValue::Bytes(b) => {
            spend(budget, b.len().div_ceil(3) * 4)?;
            v.json().map_err(|_| Unfit::NotJson)?
        }
        CelValue::Function(..) => return Err(Unfit::NotJson),
        scalar => {
            spend(budget, 1)?;
            scalar.json().map_err(|_| Unfit::NotJson)?
        }
    })
}

/// The most JSON bytes made of a value only to quote it in a reason.
const SHOWN_BUDGET: usize = 4096;

/// A CEL value as JSON text (what the customer wrote and sees), with its CEL type, cut short.
pub fn shown(v: &CelValue) -> String {
    if matches!(v, CelValue::Null) {
        return "null".to_owned();
    }
    let kind = kind(v);
    let mut budget = SHOWN_BUDGET;
    let text = match to_json_within(v, &mut budget) {
        Ok(j) => j.to_string(),
        Err(_) => return kind.to_owned(),
    };
    let mut cut = text.len().min(MAX_SHOWN);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let ellipsis = if cut < text.len() { "…" } else { "" };
    format!("{}{ellipsis} ({kind})", &text[..cut])
}

/// The interpreter's error with values shown as JSON, not as Rust debug output.
fn describe_error(e: &ExecutionError) -> String {
    use ExecutionError as E;
    match e {
        E::ValuesNotComparable(a, b) => {
            format!("{} can not be compared to {}", shown(a), shown(b))
        }
        E::UnsupportedBinaryOperator(op, a, b) => {
            format!(
                "operator {op} does not apply to {} and {}",
                shown(a),
                shown(b)
            )
        }
        E::UnsupportedUnaryOperator(op, a) => {
            format!("operator {op} does not apply to {}", shown(a))
        }
        E::Overflow(op, a, b) => format!("{} {op} {} overflows", shown(a), shown(b)),
        E::DivisionByZero(a) => format!("{} divided by zero", shown(a)),
        E::RemainderByZero(a) => format!("remainder of {} by zero", shown(a)),
        E::IndexOutOfBounds(i) => format!("index {} is out of bounds", shown(i)),
        E::UnsupportedIndex(i, t) => format!("{} can not index {}", shown(i), shown(t)),
        E::UnsupportedMapIndex(i) => format!("{} can not be a map key", shown(i)),
        E::UnsupportedListIndex(i) => format!("{} can not be a list index", shown(i)),
        E::UnsupportedKeyType(k) => format!("{} can not be a map key", shown(k)),
        E::UnsupportedTargetType { target } => format!("not supported on {}", shown(target)),
        E::NotSupportedAsMethod { method, target } => {
            format!("{method}() is not a method of {}", shown(target))
        }
        E::NoSuchKey(k) => format!("no field '{k}' in the event"),
        other => other.to_string(),
    }
}

/// When an expression's outermost operation can only yield a non-boolean (arithmetic, a
/// literal, a list or map, a conversion), what it yields: such a condition is refused when saved.
fn never_bool(e: &IdedExpr) -> Option<&'static str> {
    match &e.expr {
        Expr::Literal(CelVal::Boolean(_)) => None,
        Expr::Literal(CelVal::Null) => Some("null"),
        Expr::Literal(CelVal::String(_)) => Some("a string"),
        Expr::Literal(CelVal::Bytes(_)) => Some("bytes"),
        Expr::Literal(_) => Some("a number"),
        Expr::List(_) => Some("a list"),
        Expr::Map(_) | Expr::Struct(_) => Some("a map"),
        Expr::Call(c) => match c.func_name.as_str() {
            "_+_" | "_-_" | "_*_" | "_/_" | "_%_" | "-_" => Some("a number, string or list"),
            "size" | "int" | "uint" | "double" => Some("a number"),
            "string" => Some("a string"),
            "timestamp" => Some("a timestamp"),
            "duration" => Some("a duration"),
            "_?_:_" => {
                let (a, b) = (c.args.get(1)?, c.args.get(2)?);
                never_bool(a).and(never_bool(b))
            }
            _ => None,
        },
        _ => None,
    }
}

fn run(program: &Program, ctx: &Context<'_>) -> Result<CelValue, String> {
    // Contain panics from the interpreter on odd input, as in compile.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.execute(ctx))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(describe_error(&e)),
        Err(_) => Err("expression evaluation failed".into()),
    }
}

/// Most bytes of JSON one rule's mapping may make (the command's bound; `command_data` checks
/// the exact text after).
const MAPPING_BUDGET: usize = custos_api::limits::MAX_BODY_BYTES;

fn eval_mapping(
    path: &str,
    m: &Mapping,
    ctx: &Context<'_>,
    budget: &mut usize,
) -> Result<Value, EvalError> {
    Ok(match m {
        Mapping::Constant(v) => v.clone(),
        Mapping::Expr(p) => {
            let v = run(p, ctx).map_err(|message| EvalError::Mapping {
                path: path.to_owned(),
                message,
            })?;
            to_json_within(&v, budget).map_err(|why| EvalError::Mapping {
                path: path.to_owned(),
                message: match why {
                    Unfit::TooLong => format!(
                        "the mapped data is more than a command may hold ({MAPPING_BUDGET} bytes)"
                    ),
                    Unfit::NotJson => format!("{} has no JSON form", kind(&v)),
                },
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
                out.insert(k.clone(), eval_mapping(&p, sub, ctx, budget)?);
            }
            Value::Object(out)
        }
        Mapping::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, sub)| eval_mapping(&format!("{path}[{i}]"), sub, ctx, budget))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Cost units all the rules one event triggers may spend together: a customer keeps up to
/// [`custos_api::limits::MAX_RULES_PER_CUSTOMER`] rules, each within [`EVAL_BUDGET`], and
/// they run one after another on the profile's thread (others' events wait behind them).
pub const EVENT_EVAL_BUDGET: u64 = 4 * EVAL_BUDGET;

impl CompiledRule {
    /// What running the rule on this event could cost at most ([`EVAL_BUDGET`] units for the
    /// costliest rule an event may run).
    pub fn cost_on(&self, scope: &EventScope) -> u64 {
        let body = &*self.body;
        let mut programs: Vec<&Program> = body.condition.iter().map(Arc::as_ref).collect();
        mapping_programs(&body.mapping, &mut programs);
        rule_cost(&programs, scope.bound)
    }

    /// Runs the rule on an event: `Ok(None)` when the condition is false, else the
    /// command's data.
    pub fn evaluate(&self, scope: &EventScope) -> Result<Option<Value>, EvalError> {
        let body = &*self.body;
        // Within the bisected bound by its longest collection, an event holding no more values
        // than that is within the budget; one holding more (nested lists) is priced as it is.
        if scope.bound.longest > body.max_collection
            || (scope.bound.values > scope.bound.longest && self.cost_on(scope) > EVAL_BUDGET)
        {
            return Err(EvalError::OverBudget {
                estimate: self.cost_on(scope),
                budget: EVAL_BUDGET,
            });
        }
        let ctx = scope.context(functions());
        if let Some(cond) = &body.condition {
            match run(cond, &ctx).map_err(EvalError::Condition)? {
                CelValue::Bool(true) => {}
                CelValue::Bool(false) => return Ok(None),
                other => return Err(EvalError::NotBool(shown(&other))),
            }
        }
        let mut budget = MAPPING_BUDGET;
        eval_mapping("", &body.mapping, &ctx, &mut budget).map(Some)
    }

    /// Runs the condition on an event shaped like the event type's JSON Schema says (see
    /// [`sample_of_schema`]): when it yields something other than true or false there, what.
    /// Errors on the sample (a field it lacks) say nothing about real events, so they pass.
    pub fn condition_type_error(&self, event_type: &str, schema: &Value) -> Option<String> {
        self.body.condition.as_ref()?;
        let mut event = CloudEvent::new("sample", &self.record.when_entity, event_type);
        event.data = Some(sample_of_schema(schema, 0));
        match self.evaluate(&EventScope::new(&event)) {
            Err(EvalError::NotBool(v)) => Some(v),
            _ => None,
        }
    }
}

/// A value of the shape a JSON Schema describes (`const`, first `enum` value, `minimum`,
/// `default`, else a zero value of the declared type; every property of an object), for
/// type-checking a condition when it is saved.
pub fn sample_of_schema(schema: &Value, depth: usize) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    let Some(o) = schema.as_object() else {
        return Value::Null;
    };
    if let Some(v) = o.get("const").or_else(|| o.get("default")) {
        return v.clone();
    }
    if let Some(v) = o
        .get("enum")
        .and_then(|e| e.as_array())
        .and_then(|e| e.first())
    {
        return v.clone();
    }
    if let Some(first) = ["oneOf", "anyOf", "allOf"]
        .iter()
        .find_map(|k| o.get(*k).and_then(|v| v.as_array()).and_then(|v| v.first()))
    {
        return sample_of_schema(first, depth + 1);
    }
    let ty = match o.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(|t| t.as_str())
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if o.contains_key("properties") => "object",
        _ => return Value::Null,
    };
    match ty {
        "object" => Value::Object(
            o.get("properties")
                .and_then(|p| p.as_object())
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), sample_of_schema(v, depth + 1)))
                .collect(),
        ),
        "array" => Value::Array(
            o.get("items")
                .map(|i| vec![sample_of_schema(i, depth + 1)])
                .unwrap_or_default(),
        ),
        "integer" => o
            .get("minimum")
            .and_then(Value::as_i64)
            .map_or(Value::from(0), Value::from),
        "number" => o
            .get("minimum")
            .cloned()
            .filter(Value::is_number)
            .unwrap_or(Value::from(0.5)),
        "boolean" => Value::Bool(false),
        "string" => Value::String(match o.get("format").and_then(|f| f.as_str()) {
            Some("date-time") => "2026-01-01T00:00:00Z".into(),
            Some("date") => "2026-01-01".into(),
            _ => "x".into(),
        }),
        _ => Value::Null,
    }
}

/// A customer's rules, indexed by (source entity, event type). Rules are kept as stored
/// and compiled when an event first needs them: a profile rebuilt for one event compiles
/// only the rules that event triggers (parsing CEL was a fifth of a node's CPU when every
/// rule of every cold profile was compiled), and an idle profile holds records, not programs.
#[derive(Debug, Default)]
pub struct RuleSet {
    /// source entity -> event type -> compiled rules; nested so lookups borrow `&str` keys.
    by_trigger: HashMap<String, HashMap<String, Vec<CompiledRule>>>,
    /// Rules not compiled yet, indexed the same way.
    stored: HashMap<String, HashMap<String, Vec<RuleRecord>>>,
}

impl RuleSet {
    /// Indexes stored rules, to be compiled when an event triggers them.
    pub fn new(rules: impl IntoIterator<Item = RuleRecord>) -> Self {
        let mut set = RuleSet::default();
        for r in rules {
            set.insert_stored(r);
        }
        set
    }

    /// Adds or replaces a compiled rule.
    pub fn insert(&mut self, rule: CompiledRule) {
        self.remove(&rule.record.id);
        self.by_trigger
            .entry(rule.record.when_entity.clone())
            .or_default()
            .entry(rule.record.when_event_type.clone())
            .or_default()
            .push(rule);
    }

    /// Adds or replaces a rule, compiled when an event first triggers it.
    pub fn insert_stored(&mut self, rule: RuleRecord) {
        self.remove(&rule.id);
        self.stored
            .entry(rule.when_entity.clone())
            .or_default()
            .entry(rule.when_event_type.clone())
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
        self.stored.retain(|_, by_type| {
            by_type.retain(|_, rules| {
                rules.retain(|r| r.id != rule_id);
                !rules.is_empty()
            });
            !by_type.is_empty()
        });
    }

    /// Compiles the stored rules triggered by (source, event type). A stored rule that no
    /// longer compiles (the language's limits tightened since it was saved) is dropped with a
    /// warning, as if it were not there.
    pub fn prepare(&mut self, source: &str, event_type: &str) {
        let Some(by_type) = self.stored.get_mut(source) else {
            return;
        };
        let Some(records) = by_type.remove(event_type) else {
            return;
        };
        if by_type.is_empty() {
            self.stored.remove(source);
        }
        for r in records {
            let id = r.id.clone();
            match compile(r) {
                Ok(c) => self.insert(c),
                Err(e) => {
                    tracing::warn!(rule = %id, error = %e, "stored rule does not compile; skipped")
                }
            }
        }
    }

    /// The compiled rules triggered by (source, event type); [`RuleSet::prepare`] first.
    pub fn matching(&self, source: &str, event_type: &str) -> &[CompiledRule] {
        self.by_trigger
            .get(source)
            .and_then(|by_type| by_type.get(event_type))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// True when any rule names `entity` as trigger or target.
    pub fn names_entity(&self, entity: &str) -> bool {
        let compiled = self
            .by_trigger
            .values()
            .flat_map(HashMap::values)
            .flatten()
            .map(|r| &r.record);
        let stored = self.stored.values().flat_map(HashMap::values).flatten();
        compiled
            .chain(stored)
            .any(|r| r.when_entity == entity || r.then_entity == entity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// Fuzzing customer-written CEL (PROPTEST_CASES=100000 for a longer run): compiling and
        /// evaluating never panic, on text from CEL's own alphabet.
        #[test]
        fn arbitrary_expressions_never_panic(
            src in "[a-z0-9_.()\\[\\]{}+*/%<>=!&|?:,\"' -]{0,160}",
        ) {
            if let Ok(rule) = compile(record("r", Some(&src), json!({}))) {
                let _ = rule.evaluate(&EventScope::new(&event(1)));
            }
            let mapping = json!({"arrival": src});
            if let Ok(rule) = compile(record("r", None, mapping)) {
                let _ = rule.evaluate(&EventScope::new(&event(1)));
            }
        }

        /// Rule specs as a client sends them: arbitrary JSON mappings (nested objects, arrays,
        /// expressions at the leaves) compile or are refused, and run, without a panic.
        #[test]
        fn arbitrary_mappings_never_panic(data in proptest::prop_oneof![
            proptest::strategy::Just(json!({})),
            ".{0,40}".prop_map(|s| json!({"a": s})),
        ].prop_recursive(4, 64, 8, |inner| proptest::prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(|v| json!({"l": v})),
            proptest::collection::hash_map("[a-z.]{0,6}", inner, 0..8)
                .prop_map(|m| serde_json::to_value(m).unwrap_or_default()),
        ])) {
            if let Ok(rule) = compile(record("r", None, data)) {
                let _ = rule.evaluate(&EventScope::new(&event(90)));
            }
        }

        #[test]
        fn arbitrary_rule_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            if let Ok(spec) = serde_json::from_slice::<custos_api::types::RuleSpec>(&body) {
                let mut r = record("r", spec.when.condition.as_deref(), spec.then.data);
                r.name = spec.name;
                let _ = compile(r);
            }
        }

        #[test]
        fn expressions_over_event_fields_never_panic(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "data", "data.delay_minutes", "data.flight", "subject", "type", "time",
                    "+", "-", "*", "/", "%", "==", "!=", "<", ">", "&&", "||", "!", "(", ")",
                    "[", "]", ".size()", ".exists(x, x", ".all(y, y", ".map(z, z", "1", "0",
                    "\"a\"", "true", "null", "in", ",", "?", ":", "int(", "string(",
                    "matches(\"a+\")", "startsWith(\"X\")",
                ]),
                0..40,
            ),
        ) {
            let src = parts.join(" ");
            if let Ok(rule) = compile(record("r", Some(&src), json!({}))) {
                let _ = rule.evaluate(&EventScope::new(&event(90)));
            }
        }
    }
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
        let out = rule
            .evaluate(&EventScope::new(&event(90)))
            .expect("evaluates");
        assert_eq!(
            out,
            Some(json!({"arrival": "2026-11-28T22:10:00Z", "flight": "XY123",
                        "note": "late by 90", "nights": 1, "extra": {"by": "airline"}}))
        );
        assert_eq!(rule.evaluate(&EventScope::new(&event(30))), Ok(None));
    }

    #[test]
    fn numbers_reach_the_mapping_and_leave_it_exactly_as_sent() {
        // Each text reads back as one double; a parser that rounds one of them wrongly (as
        // serde_json's default did with 3e30) hands the rule a neighbouring number.
        let rule = compile(record(
            "r",
            None,
            json!({"x": "data.x", "scaled": "data.x * 1.0", "literal": 0.30000000000000004}),
        ))
        .expect("compiles");
        for text in [
            "3e30",
            "1e23",
            "8.98846567431158e307",
            "2.2250738585072014e-308",
            "0.1",
        ] {
            let exact: f64 = text.parse().expect("a number");
            let body = format!(
                r#"{{"specversion":"1.0","id":"e1","source":"airline","type":"flight.delayed","data":{{"x":{text}}}}}"#
            );
            let event: CloudEvent = serde_json::from_str(&body).expect("an event");
            let out = rule
                .evaluate(&EventScope::new(&event))
                .expect("evaluates")
                .expect("no condition");
            assert_eq!(out["x"].as_f64(), Some(exact), "{text}");
            assert_eq!(out["scaled"].as_f64(), Some(exact), "{text}");
            assert_eq!(out["literal"].as_f64(), Some(0.30000000000000004));
            let sent = format!(r#""x":{}"#, Value::from(exact));
            assert!(out.to_string().contains(&sent), "{out}");
        }
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
        assert!(matches!(
            rule.evaluate(&EventScope::new(&event(1))),
            Err(EvalError::Condition(_))
        ));
        let rule = compile(record("r", Some("data.flight"), json!({}))).expect("compiles");
        assert!(matches!(
            rule.evaluate(&EventScope::new(&event(1))),
            Err(EvalError::NotBool(_))
        ));
    }

    #[test]
    fn conditions_that_cannot_yield_a_bool_are_refused_and_reasons_show_json() {
        for src in [
            "data.delay_minutes + 1",
            "'late'",
            "42",
            "[1, 2]",
            "size(data.flight)",
            "data.delay_minutes > 0 ? 1 : 2",
        ] {
            let e = compile(record("r", Some(src), json!({}))).expect_err(src);
            assert!(e.message.contains("not true or false"), "{src}: {e}");
        }
        for src in ["data.delay_minutes > 1 ? true : false", "data.ok", "true"] {
            compile(record("r", Some(src), json!({}))).expect(src);
        }
        // A non-boolean field: known only at run time without a schema; shown as JSON.
        let rule = compile(record("r", Some("data.delay_minutes"), json!({}))).expect("compiles");
        let e = rule
            .evaluate(&EventScope::new(&event(31)))
            .expect_err("not a bool");
        assert_eq!(
            e.to_string(),
            "condition yielded 31 (an int), not true or false"
        );
        let rule = compile(record("r", Some("data.flight > 60"), json!({}))).expect("compiles");
        let e = rule
            .evaluate(&EventScope::new(&event(31)))
            .expect_err("not comparable");
        assert_eq!(
            e.to_string(),
            "condition: \"XY123\" (a string) can not be compared to 60 (an int)"
        );
        assert!(!e.to_string().contains("String("), "{e}");
        // With the event type's schema, the same rule is refused when saved.
        let schema = json!({"type": "object", "properties": {
            "delay_minutes": {"type": "integer", "minimum": 1},
            "flight": {"type": "string"},
            "legs": {"type": "array", "items": {"type": "object", "properties": {"to": {"type": "string"}}}}}});
        let rule = compile(record("r", Some("data.delay_minutes"), json!({}))).expect("compiles");
        assert_eq!(
            rule.condition_type_error("flight.delayed", &schema)
                .as_deref(),
            Some("1 (an int)")
        );
        for ok in [
            "data.delay_minutes > 60",
            "data.legs.exists(l, l.to == 'BCN')",
            "data.nope",
        ] {
            let rule = compile(record("r", Some(ok), json!({}))).expect(ok);
            assert_eq!(
                rule.condition_type_error("flight.delayed", &schema),
                None,
                "{ok}"
            );
        }
    }

    /// Ten comprehensions over ten elements nested: 10^10 steps if it ran.
    fn nested_all(levels: usize) -> String {
        let mut src = "true".to_owned();
        for i in 0..levels {
            src = format!("[0,1,2,3,4,5,6,7,8,9].all(a{i}, {src})");
        }
        src
    }

    #[test]
    fn hostile_expressions_are_refused_when_saved() {
        let refused = |src: &str| {
            let e = compile(record("r", Some(src), json!({}))).expect_err(src);
            assert_eq!(e.field, "when.condition", "{e}");
            e.message
        };
        let m = refused(&nested_all(10));
        assert!(m.contains("comprehensions"), "{m}");
        assert!(compile(record("r", Some(&nested_all(2)), json!({}))).is_ok());
        // Left-recursive chains: bounded before the parser sees them, at the size limit too.
        let chain = vec!["1"; 2_000].join("+") + " > 0";
        assert!(refused(&chain).contains("operators"));
        let fields = "data".to_owned() + &".f".repeat(1_000);
        assert!(refused(&fields).contains("operators"));
        let longest = vec!["1"; MAX_EXPR_LEN / 2 - 2].join("+") + ">0";
        assert!(longest.len() <= MAX_EXPR_LEN);
        refused(&longest);
        // Deep but few operators: the bracket bound.
        let deep = "(".repeat(60) + "true" + &")".repeat(60);
        assert!(refused(&deep).contains("brackets"));
        // Nested twice over the event's lists, copying and scanning strings at each step.
        let costly = format!(
            "data.l.all(a, data.l.all(b, ({}).contains(string(a))))",
            ["data.s"; 10].join(" + ")
        );
        let costly = costly.as_str();
        let m = refused(costly);
        assert!(m.contains("too costly"), "{m}");
    }

    #[test]
    fn compiling_at_the_limits_fits_a_small_thread_stack() {
        // The smallest stack a rule is compiled or run on is a worker's (2 MiB); try on 256 KiB.
        let exprs = [
            vec!["1"; MAX_OPERATORS - 1].join("+") + ">0",
            vec!["1"; MAX_OPERATORS - 1].join("&&"),
            "data".to_owned() + &".f".repeat(MAX_OPERATORS),
            "(".repeat(MAX_BRACKETS) + "true" + &")".repeat(MAX_BRACKETS),
            "[".repeat(MAX_BRACKETS) + &"]".repeat(MAX_BRACKETS) + " == []",
            "!".repeat(MAX_OPERATORS) + "true",
            "-".repeat(MAX_OPERATORS) + "1 > 0",
        ];
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                for src in exprs {
                    if let Ok(rule) = compile(record("r", Some(&src), json!({}))) {
                        let _ = rule.evaluate(&EventScope::new(&event(1)));
                    }
                }
            })
            .expect("thread");
        assert!(
            handle.join().is_ok(),
            "a stack overflow would abort, not return"
        );
    }

    #[test]
    fn an_event_too_large_for_a_rule_is_not_evaluated() {
        let rule = compile(record(
            "r",
            Some("data.items.exists(i, data.items.exists(j, i == j + 1))"),
            json!({}),
        ))
        .expect("within the budget on small events");
        let mut small = event(1);
        small.data = Some(json!({"items": (0..50).collect::<Vec<_>>()}));
        assert!(matches!(
            rule.evaluate(&EventScope::new(&small)),
            Ok(Some(_))
        ));
        let mut large = event(1);
        large.data = Some(json!({"items": (0..20_000).collect::<Vec<_>>()}));
        let e = rule
            .evaluate(&EventScope::new(&large))
            .expect_err("over the budget");
        assert!(matches!(e, EvalError::OverBudget { estimate, budget } if estimate > budget));
        assert!(e.to_string().contains("not evaluated"), "{e}");
    }

    #[test]
    fn functions_that_scan_a_list_and_patterns_in_loops_are_priced() {
        // A condition accepted when saved, on an event whose list `a` has `n` elements.
        let on_list = |condition: &str, n: usize| {
            let rule = compile(record("r", Some(condition), json!({})))
                .expect("within the budget on small events");
            let mut e = event(1);
            e.data = Some(json!({"a": (0..n).collect::<Vec<_>>()}));
            rule.evaluate(&EventScope::new(&e))
        };
        // `max` scans its list: inside two loops it is cubic in the list's length.
        assert!(matches!(
            on_list("data.a.all(x, data.a.all(y, max(data.a) >= 0))", 1000),
            Err(EvalError::OverBudget { .. })
        ));
        // A pattern compiled once per element of a large list.
        assert!(matches!(
            on_list("data.a.exists(x, string(x).matches('^[0-9]+$'))", 1000),
            Err(EvalError::OverBudget { .. })
        ));
    }

    #[test]
    fn a_value_grown_in_a_chain_of_maps_is_priced_by_what_it_grows_to() {
        // Each `map(x, x + x)` doubles every string: thirty of them would make a thousand
        // bytes into a terabyte, which the bound that took `x` to be as long as the event's
        // longest priced as linear (the rule was saved, and aborted the node when it ran).
        let chain = |stages: usize| {
            format!(
                "['{}']{}",
                "a".repeat(1000),
                ".map(x, x + x)".repeat(stages)
            )
        };
        for stages in [30, 24] {
            let in_mapping = compile(record("r", None, json!({ "x": chain(stages) })));
            let why = in_mapping.err().map(|e| e.message).unwrap_or_default();
            assert!(why.contains("too costly"), "{stages} stages: {why}");
            let in_condition = compile(record(
                "r",
                Some(&format!("{}.size() > 0", chain(stages))),
                json!({}),
            ));
            assert!(in_condition.is_err(), "{stages} stages in a condition");
        }
        // A short chain is within the budget and runs as written.
        let rule = compile(record("r", None, json!({ "x": chain(2) }))).expect("two stages");
        let data = rule
            .evaluate(&EventScope::new(&event(90)))
            .expect("runs")
            .expect("no condition");
        assert_eq!(data["x"][0].as_str().map(str::len), Some(4000));
        // Bound variables carry what they hold into nested comprehensions too.
        let grown = "[data.flight + data.flight].map(x, [x + x].map(y, y + y + y + y))";
        let rule = compile(record("r", None, json!({ "x": grown }))).expect("small");
        let data = rule
            .evaluate(&EventScope::new(&event(90)))
            .expect("runs")
            .expect("no condition");
        assert_eq!(data["x"][0][0].as_str().map(str::len), Some(5 * 2 * 2 * 4));
        let mut scope: Bound<'_> = Vec::new();
        let program = Program::compile(grown).expect("parses");
        let bound = size(program.expression(), EventBound::flat(5), &mut scope);
        assert!(bound.whole() >= 5 * 2 * 2 * 4, "{bound:?}");
    }

    #[test]
    fn a_comparison_is_priced_by_the_values_it_walks() {
        // Five copies of the element, fifteen times over: a list of length 1 holding 5^15
        // values. Built twice, the two sides share nothing, and `==` compares every value:
        // priced by the lists' length, it was saved as under a thousand steps.
        let five = format!("[1]{}", ".map(x, [x, x, x, x, x])".repeat(15));
        let why = compile(record("r", Some(&format!("{five} == {five}")), json!({})))
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(why.contains("too costly"), "{why}");
        // Comparing the event's own values is priced by what they hold: a list of a hundred
        // lists of a hundred numbers is a hundred long and holds ten thousand; compared to
        // itself for each pair of another list's elements, priced by its length, it ran a
        // hundred million comparisons on each event.
        assert!(compile(record("r", Some("data.flight == 'XY123'"), json!({}))).is_ok());
        let rule = compile(record(
            "r",
            Some("data.k.all(a, data.k.all(b, data.m == data.m))"),
            json!({}),
        ))
        .expect("within the budget on small events");
        let mut nested = event(1);
        nested.data = Some(json!({"k": vec![1; 100], "m": vec![vec![1; 100]; 100]}));
        assert!(matches!(
            rule.evaluate(&EventScope::new(&nested)),
            Err(EvalError::OverBudget { .. })
        ));
        // The same rule on a flat event of that length runs.
        let mut flat = event(1);
        flat.data = Some(json!({"k": vec![1; 100], "m": vec![1; 100]}));
        assert!(matches!(
            rule.evaluate(&EventScope::new(&flat)),
            Ok(Some(_))
        ));
        // `has()` looks among every key of the map: priced by its size.
        let rule = compile(record(
            "r",
            Some("data.l.all(i, data.l.all(j, has(data.m.z)))"),
            json!({}),
        ))
        .expect("within the budget on small events");
        let mut e = event(1);
        let keys: Map<String, Value> = (0..1000).map(|k| (format!("k{k}"), json!(k))).collect();
        e.data = Some(json!({"l": vec![0; 1000], "m": keys}));
        assert!(matches!(
            rule.evaluate(&EventScope::new(&e)),
            Err(EvalError::OverBudget { .. })
        ));
    }

    #[test]
    fn copies_of_the_event_in_a_rules_output_are_bounded_as_they_are_made() {
        // A list of references to the event's data costs the interpreter a pointer each; its
        // JSON, or its debug text in an error, a copy each.
        let mut e = event(90);
        e.data = Some(json!({"blob": "x".repeat(20_000)}));
        let copies = format!("[{}]", vec!["data"; 100].join(", "));
        let rule = compile(record("r", None, json!({ "x": copies }))).expect("cheap to run");
        let why = rule
            .evaluate(&EventScope::new(&e))
            .expect_err("two megabytes of copies")
            .to_string();
        assert!(why.contains("more than a command may hold"), "{why}");
        // A conversion refused by the type, not by writing the value out.
        let rule = compile(record(
            "r",
            Some(&format!("string({copies}) == ''")),
            json!({}),
        ))
        .expect("saved");
        let why = rule
            .evaluate(&EventScope::new(&e))
            .expect_err("a list is no string")
            .to_string();
        assert!(why.contains("cannot convert a list to string"), "{why}");
        assert!(why.len() < 300, "{why}");
        // A reason quoting such a value stays short.
        let list = CelValue::List(Arc::new(vec![
            json_to_cel(
                &e.data.clone().unwrap_or_default()
            );
            100
        ]));
        assert_eq!(shown(&list), "a list");
        // Within the bound, a mapping copies the event as before.
        let rule = compile(record("r", None, json!({ "x": "[data, data]" }))).expect("saved");
        let data = rule
            .evaluate(&EventScope::new(&e))
            .expect("fits")
            .expect("no condition");
        assert_eq!(data["x"][1]["blob"].as_str().map(str::len), Some(20_000));
    }

    #[test]
    fn index_by_trigger() {
        let mut set = RuleSet::default();
        set.insert(compile(record("a", None, json!({}))).expect("a"));
        set.insert(compile(record("b", None, json!({}))).expect("b"));
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

    #[test]
    fn one_text_is_parsed_once_and_its_checks_still_apply() {
        let src = "data.delay_minutes > 61 && data.flight == 'parsed-once'";
        let a = compile(record(
            "a",
            Some(src),
            json!({"f": "data.flight + '-once'"}),
        ))
        .expect("a");
        let b = compile(record(
            "b",
            Some(src),
            json!({"f": "data.flight + '-once'"}),
        ))
        .expect("b");
        let (ca, cb) = (a.body.condition.as_ref(), b.body.condition.as_ref());
        assert!(ca.zip(cb).is_some_and(|(x, y)| Arc::ptr_eq(x, y)));
        // The same texts share their whole compiled body; other data does not.
        assert!(Arc::ptr_eq(&a.body, &b.body));
        // The texts lent to the lookup are back in the record, on a miss (a) and a hit (b).
        for rule in [&a, &b] {
            assert_eq!(rule.record.condition.as_deref(), Some(src));
            assert_eq!(rule.record.data_json, r#"{"f":"data.flight + '-once'"}"#);
        }
        let c = compile(record("c", Some(src), json!({"f": "data.flight"}))).expect("c");
        assert!(!Arc::ptr_eq(&a.body, &c.body));
        assert!(c
            .body
            .condition
            .as_ref()
            .is_some_and(|x| ca.is_some_and(|y| Arc::ptr_eq(x, y))));
        // A text that failed is not kept: it fails again, with the field it is in.
        let bad = "data.delay_minutes + unknown_var";
        for field in ["when.condition", "then.data.f"] {
            let e = if field == "when.condition" {
                compile(record("c", Some(bad), json!({})))
            } else {
                compile(record("c", None, json!({"f": bad})))
            }
            .expect_err("unknown variable");
            assert_eq!(e.field, field);
        }
    }

    #[test]
    fn a_shared_cache_keeps_what_was_made_and_is_emptied_when_full() {
        let cache: SharedCache<String, usize> = SharedCache::new(2);
        let made = std::cell::Cell::new(0);
        let make = |v: usize| {
            made.set(made.get() + 1);
            Ok::<_, ()>(v)
        };
        let one = cache.get_or_try_insert("one", || make(1));
        assert_eq!(one.as_deref(), Ok(&1));
        // Held: not made again, the same value shared.
        let again = cache.get_or_try_insert("one", || make(10));
        assert!(matches!((&one, &again), (Ok(x), Ok(y)) if Arc::ptr_eq(x, y)));
        assert_eq!(made.get(), 1);
        // A failure is not kept.
        assert_eq!(
            cache.get_or_try_insert("bad", || Err::<usize, _>(())),
            Err(())
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.get_or_try_insert("two", || make(2)).as_deref(),
            Ok(&2)
        );
        assert_eq!(cache.len(), 2);
        // Full: emptied before the third goes in.
        assert_eq!(
            cache.get_or_try_insert("three", || make(3)).as_deref(),
            Ok(&3)
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.get_or_try_insert("one", || make(4)).as_deref(),
            Ok(&4)
        );
        assert_eq!(made.get(), 4);
    }

    #[test]
    fn stored_rules_are_compiled_only_when_triggered() {
        let mut cancelled = record("c", Some("data.delay_minutes > 1"), json!({}));
        cancelled.when_event_type = "flight.cancelled".into();
        let broken = record("x", Some("data.delay_minutes >"), json!({}));
        let mut set = RuleSet::new([record("a", None, json!({})), cancelled, broken]);
        assert!(set.matching("airline", "flight.delayed").is_empty());
        assert!(set.names_entity("hotel"), "stored rules count");
        set.prepare("airline", "flight.delayed");
        // The broken one is dropped, the other trigger's rule stays stored.
        let ids: Vec<&str> = set
            .matching("airline", "flight.delayed")
            .iter()
            .map(|r| r.record.id.as_str())
            .collect();
        assert_eq!(ids, ["a"]);
        assert!(set.matching("airline", "flight.cancelled").is_empty());
        assert_eq!(set.stored.len(), 1);
        set.remove("c");
        set.prepare("airline", "flight.cancelled");
        assert!(set.matching("airline", "flight.cancelled").is_empty());
        assert!(set.stored.is_empty());
        // A stored rule replaced by a compiled one with the same id is not kept twice.
        set.insert_stored(record("a", None, json!({"v": "1"})));
        set.prepare("airline", "flight.delayed");
        assert_eq!(set.matching("airline", "flight.delayed").len(), 1);
    }
}
