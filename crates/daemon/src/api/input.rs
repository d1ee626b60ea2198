//! Request input read by hand, so that every mistake becomes an [`ApiError`](api::ApiError)
//! naming the field: JSON bodies (through `serde_path_to_error`, which knows where in the
//! document a value failed) and query strings.

use super::failure::Failure;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// Parses a JSON body. Malformed JSON (syntax, truncated, trailing data) is a 400 with code
/// `malformed_json` and field `body`; a well-formed document of the wrong shape (unknown
/// field, wrong type, missing field, bad value) is a 400 `invalid_request` naming the field's
/// path, e.g. `config.cpus`.
pub fn json_body<T: DeserializeOwned>(
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<T, Failure> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_request"
        };
        Failure::new(status, code, Some("body".into()), r.body_text())
    })?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_failure(&path, &inner)
    })?;
    de.end().map_err(|e| json_failure(".", &e))?;
    Ok(value)
}

fn json_failure(path: &str, e: &serde_json::Error) -> Failure {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => Failure::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            Some("body".into()),
            format!("malformed JSON: {e}"),
        ),
        Category::Data => {
            let msg = e.to_string();
            // serde_json appends " at line L column C"; the field path says where.
            let reason = match msg.rfind(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            Failure::bad_request(&field_path(path, &reason), reason)
        }
    }
}

/// The path of the field an error is about. serde_path_to_error gives the path of the value
/// being read; for a missing field that is the enclosing object, so the field's name (from the
/// message) is appended.
fn field_path(path: &str, reason: &str) -> String {
    let named = |prefix: &str| {
        reason
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string)
    };
    let base = if path == "." { "" } else { path };
    match named("missing field `") {
        Some(name) if base.is_empty() => name,
        Some(name) => format!("{base}.{name}"),
        None if base.is_empty() => "body".into(),
        None => base.to_string(),
    }
}

/// A query string's `key=value` pairs, refusing keys not in `known` and repeated keys.
pub fn query_pairs<'a>(
    query: Option<&'a str>,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, Failure> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for item in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        if !known.contains(&k) {
            return Err(Failure::bad_request(
                k,
                format!("unknown query parameter (known: {})", known.join(", ")),
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(Failure::bad_request(k, "given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// A boolean query value: `true`/`false` (also `1`/`0`; empty means true).
pub fn query_bool(key: &str, v: &str) -> Result<bool, Failure> {
    match v {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(Failure::bad_request(
            key,
            format!("{v:?}: expected true or false"),
        )),
    }
}

/// A whole-number query value in `min..=max`.
pub fn query_int(key: &str, v: &str, min: i64, max: i64) -> Result<i64, Failure> {
    v.parse::<i64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            Failure::bad_request(
                key,
                format!("{v:?}: expected a whole number from {min} to {max}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_missing_fields() {
        assert_eq!(field_path(".", "missing field `name`"), "name");
        assert_eq!(field_path("config", "missing field `path`"), "config.path");
        assert_eq!(field_path("config.cpus", "invalid type"), "config.cpus");
        assert_eq!(field_path(".", "invalid type"), "body");
    }

    #[test]
    fn queries() {
        let q = query_pairs(Some("force=true&x=1"), &["force"]);
        assert!(matches!(q, Err(f) if f.body.field.as_deref() == Some("x")));
        let q = query_pairs(Some("force=1"), &["force"]).unwrap_or_default();
        assert_eq!(q, vec![("force", "1")]);
        assert!(query_bool("force", "maybe").is_err());
        assert!(query_int("limit", "0", 1, 10).is_err());
    }
}
