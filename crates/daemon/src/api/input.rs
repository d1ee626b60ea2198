//! Request input read by hand, so that every mistake becomes an [`ApiError`](api::ApiError)
//! naming the field: JSON bodies (through `serde_path_to_error`, which knows where in the
//! document a value failed), query strings and the `{vm}` path segment.

use super::failure::Failure;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// Parses a JSON body. Malformed JSON (syntax, truncated, trailing data) is a 400 with code
/// `malformed_json` and field `body`; a well-formed document of the wrong shape (unknown
/// field, wrong type, missing field, bad value) is a 400 `invalid_request` naming the field's
/// path, e.g. `config.cpus`.
pub fn json_body<T: DeserializeOwned>(
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<T, Failure> {
    let bytes = body.map_err(body_failure)?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_failure(&path, &inner)
    })?;
    de.end().map_err(|e| json_failure(".", &e))?;
    Ok(value)
}

/// A body that could not be read: too large (413 `body_too_large`), or cut short or badly framed
/// (400).
pub fn body_failure(r: BytesRejection) -> Failure {
    let status = r.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "invalid_request"
    };
    Failure::new(status, code, Some("body".into()), r.body_text())
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

/// A query string's `key=value` pairs, percent-decoded (`application/x-www-form-urlencoded`:
/// `%XX` escapes, `+` for a space), refusing keys not in `known` and repeated keys.
pub fn query_pairs(query: Option<&str>, known: &[&str]) -> Result<Vec<(String, String)>, Failure> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        let k = form_decode(k).ok_or_else(|| {
            Failure::bad_request("query", format!("{item:?}: malformed percent-encoding"))
        })?;
        let v = form_decode(v).ok_or_else(|| {
            Failure::bad_request(&k, format!("{v:?}: malformed percent-encoding"))
        })?;
        if !known.contains(&k.as_str()) {
            return Err(Failure::bad_request(
                &k,
                format!("unknown query parameter (known: {})", known.join(", ")),
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(Failure::bad_request(&k, "given twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// One component of a query string, decoded: `%XX` escapes and `+` for a space. `None` when an
/// escape is malformed or the bytes are not UTF-8.
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The `{vm}` path segment: a VM's id or name. A segment that is not UTF-8 once
/// percent-decoded names no VM: 404 `not_found` like any unknown VM, as an `ApiError` (axum's
/// own `Path` rejection would be a `text/plain` 400, which the document does not have).
pub struct VmParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for VmParam {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Failure> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(vm)) => Ok(VmParam(vm)),
            Err(e) => Err(Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                Some("vm".into()),
                format!("no VM with such an id or name ({})", e.body_text()),
            )),
        }
    }
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
        assert_eq!(q, vec![("force".to_string(), "1".to_string())]);
        let q = query_pairs(Some("%66orce=tru%65"), &["force"]).unwrap_or_default();
        assert_eq!(q, vec![("force".to_string(), "true".to_string())]);
        for bad in [
            "force=%",
            "force=%4",
            "force=%zz",
            "force=%+1",
            "force=%FF",
            "%=1",
        ] {
            assert!(query_pairs(Some(bad), &["force"]).is_err(), "{bad}");
        }
        assert_eq!(form_decode("a+b%20c%C3%A9"), Some("a b cé".to_string()));
        assert!(query_bool("force", "maybe").is_err());
        assert!(query_int("limit", "0", 1, 10).is_err());
    }
}
