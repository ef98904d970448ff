//! Filters, ordering and attribute names for container records, following Rails'
//! `record_filters.rb` and `load_param.rb` closely enough that a dispatcher cannot tell.
//!
//! Records are JSON objects holding every API field; filters are `[attr, op, operand]`.

use std::cmp::Ordering;

use serde_json::{Map, Value};

/// The kind of a container column, which decides how filters compare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Text,
    Integer,
    Float,
    Time,
    Bool,
    /// Serialized or jsonb columns: selectable, not comparable.
    Json,
}

/// Every container attribute the API exposes, with its column kind.
pub const CONTAINER_ATTRS: &[(&str, Column)] = &[
    ("uuid", Column::Text),
    ("etag", Column::Text),
    ("owner_uuid", Column::Text),
    ("created_at", Column::Time),
    ("modified_at", Column::Time),
    ("modified_by_user_uuid", Column::Text),
    ("state", Column::Text),
    ("priority", Column::Integer),
    ("locked_by_uuid", Column::Text),
    ("lock_count", Column::Integer),
    ("auth_uuid", Column::Text),
    ("runtime_user_uuid", Column::Text),
    ("runtime_auth_scopes", Column::Json),
    ("command", Column::Json),
    ("container_image", Column::Text),
    ("cwd", Column::Text),
    ("environment", Column::Json),
    ("mounts", Column::Json),
    ("output_path", Column::Text),
    ("output_glob", Column::Json),
    ("output", Column::Text),
    ("output_storage_classes", Column::Json),
    ("output_properties", Column::Json),
    ("log", Column::Text),
    ("runtime_constraints", Column::Json),
    ("scheduling_parameters", Column::Json),
    ("runtime_status", Column::Json),
    ("progress", Column::Float),
    ("exit_code", Column::Integer),
    ("started_at", Column::Time),
    ("finished_at", Column::Time),
    ("gateway_address", Column::Text),
    ("interactive_session_started", Column::Bool),
    ("cost", Column::Float),
    ("subrequests_cost", Column::Float),
    ("service", Column::Bool),
    ("published_ports", Column::Json),
];

pub fn column(attr: &str) -> Option<Column> {
    CONTAINER_ATTRS
        .iter()
        .find(|(a, _)| *a == attr)
        .map(|(_, c)| *c)
}

/// One parsed filter.
#[derive(Debug, Clone)]
pub struct Filter {
    attr: String,
    col: Column,
    op: Op,
    /// Normalised operand(s): one value, or several for `in`/`not in`.
    operands: Vec<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    Like,
    ILike,
}

/// Parse a `filters` parameter (a JSON array of triples). Errors are Rails-style 422 texts.
pub fn parse_filters(v: &Value) -> Result<Vec<Filter>, String> {
    let list = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        _ => return Err(format!("Invalid value for filters parameter: {v}")),
    };
    // A single triple may be given unwrapped.
    if list.len() == 3
        && list[0].is_string()
        && list[1].is_string()
        && list.iter().all(|x| !x.is_array())
    {
        return Ok(vec![parse_one(list)?]);
    }
    list.iter()
        .map(|f| match f {
            Value::Array(t) => parse_one(t),
            other => Err(format!("Invalid element in filters array: {other}")),
        })
        .collect()
}

fn parse_one(t: &[Value]) -> Result<Filter, String> {
    let [attr, op, operand] = t else {
        return Err(format!(
            "Invalid filter {}: must have 3 elements",
            Value::from(t.to_vec())
        ));
    };
    let (Some(attr), Some(op_text)) = (attr.as_str(), op.as_str()) else {
        return Err(format!("Invalid filter {}", Value::from(t.to_vec())));
    };
    let op = match op_text.to_ascii_lowercase().as_str() {
        "=" | "==" => Op::Eq,
        "!=" | "<>" => Op::Ne,
        "<" => Op::Lt,
        "<=" => Op::Le,
        ">" => Op::Gt,
        ">=" => Op::Ge,
        "in" => Op::In,
        "not in" => Op::NotIn,
        "like" => Op::Like,
        "ilike" => Op::ILike,
        _ => return Err(format!("Invalid operator '{op_text}'")),
    };
    let Some(col) = column(attr) else {
        return Err(format!("Invalid attribute '{attr}' in filter"));
    };
    if col == Column::Json {
        return Err(format!(
            "Invalid attribute '{attr}' for operator '{op_text}' in filter"
        ));
    }
    let raw: Vec<&Value> = match op {
        Op::In | Op::NotIn => match operand {
            Value::Array(a) => a.iter().collect(),
            _ => {
                return Err(format!(
                    "Invalid operand type '{}' for '{op_text}' operator in filters",
                    type_name(operand)
                ));
            }
        },
        _ => vec![operand],
    };
    let mut operands = Vec::with_capacity(raw.len());
    for v in raw {
        operands.push(normalise(attr, col, op, v)?);
    }
    Ok(Filter {
        attr: attr.to_string(),
        col,
        op,
        operands,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NilClass",
        Value::Bool(_) => "Boolean",
        Value::Number(_) => "Number",
        Value::String(_) => "String",
        Value::Array(_) => "Array",
        Value::Object(_) => "Hash",
    }
}

/// Bring an operand to the column's type (numeric strings for integer columns, as PostgreSQL
/// casts them; timestamps parsed and re-rendered in the store's format).
fn normalise(attr: &str, col: Column, op: Op, v: &Value) -> Result<Value, String> {
    if v.is_null() {
        return match op {
            Op::Eq | Op::Ne | Op::In | Op::NotIn => Ok(Value::Null),
            _ => Err(format!("Invalid operand NULL for '{attr}' comparison")),
        };
    }
    let bad = || format!("Invalid operand {v} for {:?} attribute '{attr}'", col).to_lowercase();
    match col {
        Column::Integer => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(v.clone()),
            Value::String(s) => s.trim().parse::<i64>().map(Value::from).map_err(|_| bad()),
            _ => Err(bad()),
        },
        Column::Float => match v {
            Value::Number(_) => Ok(v.clone()),
            Value::String(s) => s.trim().parse::<f64>().map(Value::from).map_err(|_| bad()),
            _ => Err(bad()),
        },
        Column::Bool => match v {
            Value::Bool(_) => Ok(v.clone()),
            Value::String(s) if s == "true" || s == "false" => Ok(Value::Bool(s == "true")),
            _ => Err(bad()),
        },
        Column::Time => match v {
            Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| Value::from(super::store::format_time(t.with_timezone(&chrono::Utc))))
                .map_err(|_| bad()),
            _ => Err(bad()),
        },
        Column::Text => match v {
            Value::String(_) => Ok(v.clone()),
            Value::Number(n) => Ok(Value::from(n.to_string())),
            _ => Err(bad()),
        },
        Column::Json => Err(bad()),
    }
}

impl Filter {
    pub fn matches(&self, rec: &Map<String, Value>) -> bool {
        let val = rec.get(&self.attr).unwrap_or(&Value::Null);
        let operand = &self.operands.first().cloned().unwrap_or(Value::Null);
        match self.op {
            Op::Eq => equal(val, operand),
            // SQL `!=` would not match NULL, but Rails rewrites `!=` to also match NULL.
            Op::Ne => !equal(val, operand),
            Op::In => self.operands.iter().any(|o| equal(val, o)),
            Op::NotIn => !self.operands.iter().any(|o| equal(val, o)),
            Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                if val.is_null() {
                    return false;
                }
                let ord = compare_values(val, operand, self.col);
                match self.op {
                    Op::Lt => ord == Ordering::Less,
                    Op::Le => ord != Ordering::Greater,
                    Op::Gt => ord == Ordering::Greater,
                    _ => ord != Ordering::Less,
                }
            }
            Op::Like | Op::ILike => {
                let (Some(s), Some(p)) = (val.as_str(), operand.as_str()) else {
                    return false;
                };
                if self.op == Op::ILike {
                    like(&s.to_lowercase(), &p.to_lowercase())
                } else {
                    like(s, p)
                }
            }
        }
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// SQL LIKE with `%` and `_`.
fn like(s: &str, p: &str) -> bool {
    let s: Vec<char> = s.chars().collect();
    let p: Vec<char> = p.chars().collect();
    fn go(s: &[char], p: &[char]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some('%') => (0..=s.len()).any(|i| go(&s[i..], &p[1..])),
            Some('_') => !s.is_empty() && go(&s[1..], &p[1..]),
            Some(c) => s.first() == Some(c) && go(&s[1..], &p[1..]),
        }
    }
    go(&s, &p)
}

/// Compare two non-null values of one column.
fn compare_values(a: &Value, b: &Value, col: Column) -> Ordering {
    match col {
        Column::Integer | Column::Float => {
            if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
                return x.cmp(&y);
            }
            let x = a.as_f64().unwrap_or(0.0);
            let y = b.as_f64().unwrap_or(0.0);
            x.partial_cmp(&y).unwrap_or(Ordering::Equal)
        }
        Column::Bool => a.as_bool().cmp(&b.as_bool()),
        // Times are stored in one fixed-width UTC format, so text order is time order.
        _ => a.as_str().unwrap_or("").cmp(b.as_str().unwrap_or("")),
    }
}

/// One `order` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderKey {
    pub attr: String,
    pub desc: bool,
}

/// Parse `order` (a comma-separated string or a JSON array). Unknown columns are dropped
/// silently, as Rails does.
pub fn parse_order(v: &Value) -> Result<Vec<OrderKey>, String> {
    let entries: Vec<String> = match v {
        Value::Null => Vec::new(),
        Value::String(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("Invalid order {v}"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(format!("Invalid value for order parameter: {v}")),
    };
    let mut keys = Vec::new();
    for e in entries.iter().filter(|e| !e.is_empty()) {
        let mut parts = e.split_whitespace();
        let attr = parts.next().unwrap_or_default();
        let attr = attr.strip_prefix("containers.").unwrap_or(attr);
        let desc = match parts.next().map(str::to_ascii_lowercase).as_deref() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => return Err(format!("Invalid order '{e}'")),
        };
        if column(attr).is_some_and(|c| c != Column::Json) {
            keys.push(OrderKey {
                attr: attr.to_string(),
                desc,
            });
        }
    }
    Ok(keys)
}

/// Sort records by `keys`, then Rails' default tie-breakers `modified_at desc, uuid desc`.
/// NULLs sort last ascending and first descending, as in PostgreSQL. Keys for attributes not in
/// `select` are dropped, as Rails does. (The fake's pages use [`sort_first`].)
#[cfg(test)]
pub fn sort(records: &mut [&Map<String, Value>], keys: &[OrderKey], select: Option<&[String]>) {
    sort_first(records, keys, select, records.len());
}

/// Like [`sort`], but only the first `n` places are guaranteed (what a page at `offset +
/// limit` shows; the rest are in no particular order): a page of a big table costs a linear
/// selection, not a full sort, as an index would spare a real database.
pub fn sort_first(
    records: &mut [&Map<String, Value>],
    keys: &[OrderKey],
    select: Option<&[String]>,
    n: usize,
) {
    let mut all: Vec<OrderKey> = keys.to_vec();
    for (attr, desc) in [("modified_at", true), ("uuid", true)] {
        if !all.iter().any(|k| k.attr == attr) {
            all.push(OrderKey {
                attr: attr.into(),
                desc,
            });
        }
    }
    if let Some(sel) = select {
        all.retain(|k| sel.contains(&k.attr));
    }
    let cmp = |a: &&Map<String, Value>, b: &&Map<String, Value>| {
        for k in &all {
            let col = column(&k.attr).unwrap_or(Column::Text);
            let (x, y) = (
                a.get(&k.attr).unwrap_or(&Value::Null),
                b.get(&k.attr).unwrap_or(&Value::Null),
            );
            let ord = match (x.is_null(), y.is_null()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                _ => compare_values(x, y, col),
            };
            let ord = if k.desc { ord.reverse() } else { ord };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        Ordering::Equal
    };
    if n < records.len() {
        if n == 0 {
            return;
        }
        records.select_nth_unstable_by(n - 1, cmp);
        records[..n].sort_by(cmp);
    } else {
        records.sort_by(cmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn operators() {
        let r = rec(
            json!({"state":"Queued","priority":5,"locked_by_uuid":null,"uuid":"zzzzz-dz642-000000000000001"}),
        );
        let check = |f: Value| parse_filters(&f).unwrap().iter().all(|f| f.matches(&r));
        assert!(check(json!([["state", "=", "Queued"]])));
        assert!(
            check(json!([["priority", ">", "0"]])),
            "numeric string operand"
        );
        assert!(check(json!([["priority", ">=", 5], ["priority", "<=", 5]])));
        assert!(!check(json!([["priority", "<", 5]])));
        assert!(check(json!([["locked_by_uuid", "=", null]])));
        assert!(
            check(json!([["locked_by_uuid", "!=", "x"]])),
            "!= matches null"
        );
        assert!(check(json!([["locked_by_uuid", "not in", ["x"]]])));
        assert!(!check(json!([["locked_by_uuid", "in", ["x"]]])));
        assert!(check(json!([["state", "in", ["Locked", "Queued"]]])));
        assert!(check(json!([["uuid", "like", "zzzzz-dz642-%1"]])));
        assert!(check(json!(["state", "=", "Queued"])), "bare triple");
    }

    /// The first `n` places of a partial sort are those of the full sort.
    #[test]
    fn a_partial_sort_agrees_with_the_full_one_on_its_first_places() {
        let recs: Vec<Map<String, Value>> = (0..200)
            .map(|i| {
                rec(json!({
                    "uuid": format!("zzzzz-dz642-{i:015}"),
                    "priority": (i * 7919) % 13,
                    "modified_at": "2026-01-01T00:00:00.000000000Z",
                }))
            })
            .collect();
        let keys = parse_order(&json!("priority desc")).unwrap();
        let mut full: Vec<&Map<String, Value>> = recs.iter().collect();
        sort(&mut full, &keys, None);
        for n in [0, 1, 37, 199, 200, 500] {
            let mut part: Vec<&Map<String, Value>> = recs.iter().rev().collect();
            sort_first(&mut part, &keys, None, n);
            let m = n.min(200);
            assert_eq!(part[..m], full[..m], "first {n}");
        }
    }

    #[test]
    fn bad_filters_are_rejected() {
        for f in [
            json!([["priority", "=", 1.5]]),
            json!([["priority", "=", "abc"]]),
            json!([["nosuch", "=", 1]]),
            json!([["state", "~", "x"]]),
            json!([["state", "in", "x"]]),
            json!([["runtime_constraints", "=", "x"]]),
            json!([["state", "="]]),
            json!("nope"),
        ] {
            assert!(parse_filters(&f).is_err(), "{f}");
        }
    }

    #[test]
    fn order_with_tie_breakers_and_select() {
        let a = rec(json!({"uuid":"a","priority":1,"modified_at":"2024"}));
        let b = rec(json!({"uuid":"b","priority":2,"modified_at":"2023"}));
        let c = rec(json!({"uuid":"c","priority":2,"modified_at":"2025"}));
        let keys = parse_order(&json!("priority desc")).unwrap();
        let mut v = vec![&a, &b, &c];
        sort(&mut v, &keys, None);
        assert_eq!(
            v.iter()
                .map(|r| r["uuid"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["c", "b", "a"]
        );
        let sel = vec!["uuid".to_string(), "priority".to_string()];
        sort(&mut v, &keys, Some(&sel));
        assert_eq!(
            v.iter()
                .map(|r| r["uuid"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["c", "b", "a"]
        );
        let keys = parse_order(&json!(["uuid"])).unwrap();
        sort(&mut v, &keys, None);
        assert_eq!(
            v.iter()
                .map(|r| r["uuid"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(parse_order(&json!("uuid sideways")).is_err());
        assert!(parse_order(&json!("nosuch desc")).unwrap().is_empty());
    }
}
