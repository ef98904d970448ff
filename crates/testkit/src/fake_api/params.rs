//! Request parameters as Arvados' controller reads them: from the query string, a form body or
//! a JSON body. In query and form values, `""`/`null` mean null, values starting with `[`, `{`
//! or `"` are JSON, `limit`/`offset` are integers, and anything else stays a string. String
//! values inside a JSON body go through the same guessing.

use serde_json::{Map, Value};

/// Parse a request's parameters. `content_type` is the request's Content-Type header.
pub fn parse(
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    if let Some(q) = query {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            {
                let g = guess(&k, &v);
                out.insert(k.into_owned(), g);
            }
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(out);
    }
    let is_json = content_type.is_some_and(|ct| ct.starts_with("application/json"))
        || (content_type.is_none() && body.first() == Some(&b'{'));
    if is_json {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
        let Value::Object(m) = v else {
            return Err("JSON body must be an object".into());
        };
        for (k, v) in m {
            let v = match v {
                Value::String(s) => guess(&k, &s),
                other => other,
            };
            out.insert(k, v);
        }
    } else {
        for (k, v) in url::form_urlencoded::parse(body) {
            {
                let g = guess(&k, &v);
                out.insert(k.into_owned(), g);
            }
        }
    }
    Ok(out)
}

fn guess(key: &str, v: &str) -> Value {
    if v.is_empty() || v == "null" {
        return Value::Null;
    }
    if key == "limit" || key == "offset" {
        // Leave bad values as strings: the handler reports them with Rails' message.
        return v
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(v));
    }
    if (v.starts_with('[') || v.starts_with('{') || v.starts_with('"'))
        && let Ok(j) = serde_json::from_str(v)
    {
        return j;
    }
    Value::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_form_and_json_agree() {
        let q = "filters=%5B%5B%22state%22%2C%22%3D%22%2C%22Queued%22%5D%5D&limit=10&order=priority+desc&count=none";
        let from_query = parse(Some(q), None, b"").unwrap();
        let from_form = parse(
            None,
            Some("application/x-www-form-urlencoded"),
            q.as_bytes(),
        )
        .unwrap();
        let from_json = parse(
            None,
            Some("application/json"),
            br#"{"filters":[["state","=","Queued"]],"limit":10,"order":"priority desc","count":"none"}"#,
        )
        .unwrap();
        assert_eq!(from_query, from_form);
        assert_eq!(from_query, from_json);
        assert_eq!(from_query["filters"], json!([["state", "=", "Queued"]]));
        assert_eq!(from_query["limit"], json!(10));
    }

    #[test]
    fn strings_inside_json_bodies_are_guessed_too() {
        let p = parse(
            None,
            Some("application/json"),
            br#"{"container":"{\"state\":\"Cancelled\"}","x":""}"#,
        )
        .unwrap();
        assert_eq!(p["container"], json!({"state": "Cancelled"}));
        assert_eq!(p["x"], Value::Null);
    }
}
