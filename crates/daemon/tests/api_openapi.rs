//! The served OpenAPI document is OpenAPI 3, documents every route the router serves (and no
//! other), and the server's answers match the documented statuses and schemas.

mod http;

use http::{request, request_head, Server};
use serde_json::Value;
use std::path::Path;

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

fn document(srv: &Server) -> Value {
    let r = srv.get("/openapi.json");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with("application/json"));
    // It parses as an OpenAPI document...
    let parsed: utoipa::openapi::OpenApi =
        serde_json::from_slice(&r.body).expect("an OpenAPI document");
    assert!(!parsed.paths.paths.is_empty());
    let doc = r.json();
    // ... of version 3, and is the one the code generates.
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(
        doc,
        serde_json::to_value(daemon::api::openapi()).expect("json")
    );
    doc
}

fn operation<'a>(doc: &'a Value, path: &str, method: &str) -> Option<&'a Value> {
    doc["paths"][path].get(method.to_lowercase())
}

/// The documented JSON schema of the answer `status` to `method path`, if any.
fn response_schema<'a>(doc: &'a Value, path: &str, method: &str, status: u16) -> Option<&'a Value> {
    operation(doc, path, method)?["responses"][status.to_string()]["content"]["application/json"]
        .get("schema")
}

/// A small JSON Schema check: $ref, oneOf, allOf, type, enum, properties, required,
/// additionalProperties: false, items, minimum.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("{at}: unsupported $ref {r}"))?;
        let target = doc["components"]["schemas"]
            .get(name)
            .ok_or_else(|| format!("{at}: dangling $ref {r}"))?;
        return check(doc, target, v, at);
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(doc, s, v, at)?;
        }
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let ok = one.iter().filter(|s| check(doc, s, v, at).is_ok()).count();
        if ok != 1 {
            return Err(format!(
                "{at}: {v} matches {ok} of oneOf {}",
                Value::Array(one.clone())
            ));
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let is = |t: &str| match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        };
        if !types.iter().any(|t| is(t)) {
            return Err(format!("{at}: {v} is not of type {t}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in enum {}", Value::Array(e.clone())));
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            return Err(format!("{at}: {n} below minimum {min}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = req.as_str().unwrap_or("");
            if !obj.contains_key(k) {
                return Err(format!("{at}: required {k} missing in {v}"));
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, val, &format!("{at}.{k}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: undocumented property {k}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(doc, items, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Checks an answer against the document: its status is documented for the operation, and its
/// JSON body matches the documented schema.
fn conforms(doc: &Value, path: &str, method: &str, status: u16, body: &Value) {
    let op = operation(doc, path, method).unwrap_or_else(|| panic!("{method} {path} undocumented"));
    assert!(
        op["responses"].get(status.to_string()).is_some(),
        "{method} {path} answered {status}, not documented: {body}"
    );
    let schema = response_schema(doc, path, method, status)
        .unwrap_or_else(|| panic!("{method} {path} {status}: no JSON schema"));
    if let Err(e) = check(doc, schema, body, "body") {
        panic!("{method} {path} {status}: {e}");
    }
}

#[test]
fn every_route_is_documented_and_answers_as_documented() {
    let srv = Server::start("openapi");
    let doc = document(&srv);
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        let concrete = path.replace("{vm}", "no-such-vm");
        for method in METHODS {
            let documented = item.get(method.to_lowercase());
            if let Some(op) = documented {
                let responses = op["responses"].as_object().expect("responses");
                assert!(!responses.is_empty(), "{method} {path}: no responses");
                for (status, r) in responses {
                    assert!(r["description"].is_string(), "{method} {path} {status}");
                }
            }
            let streams = documented.is_some_and(|op| {
                op["responses"]["200"]["content"]
                    .get("text/event-stream")
                    .is_some()
            });
            if streams && *method == "GET" {
                let head = request_head(&srv.sock, method, &concrete).to_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
                assert!(head.contains("text/event-stream"), "{path}: {head}");
                continue;
            }
            let body = (*method == "POST").then_some(&b"{}"[..]);
            let r = request(&srv.sock, method, &concrete, body);
            let is_json = r
                .header("content-type")
                .is_some_and(|t| t.starts_with("application/json"));
            if !is_json {
                // A documented non-JSON answer (the Prometheus text of /metrics).
                let op = documented.unwrap_or_else(|| panic!("{method} {path}: {}", r.text()));
                let ct = r.header("content-type").unwrap_or("");
                let media = ct.split(';').next().unwrap_or("");
                assert!(
                    op["responses"][r.status.to_string()]["content"]
                        .get(media)
                        .is_some(),
                    "{method} {path}: {} {ct} not documented",
                    r.status
                );
                continue;
            }
            let code = r.json().get("code").cloned();
            match documented {
                Some(_) => {
                    assert!(
                        code != Some("no_route".into())
                            && code != Some("method_not_allowed".into()),
                        "{method} {path} is documented but not served: {}",
                        r.text()
                    );
                    if path != "/openapi.json" {
                        conforms(&doc, path, method, r.status, &r.json());
                    }
                }
                None => {
                    assert_eq!(r.status, 405, "{method} {path} served but undocumented");
                    assert_eq!(code, Some("method_not_allowed".into()));
                }
            }
        }
    }
    // Paths the document does not have are not served.
    for path in [
        "/",
        "/v1",
        "/v1/",
        "/v1/vms/x/y",
        "/v1/metrics",
        "/v1/vms/x/start/now",
        "/openapi.yaml",
    ] {
        for method in METHODS {
            let r = request(&srv.sock, method, path, None);
            assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
            assert_eq!(r.json()["code"], "no_route", "{method} {path}");
        }
    }
}

#[test]
fn answers_match_the_documented_schemas() {
    let srv = Server::start("schemas");
    let doc = document(&srv);
    let r = srv.post("/v1/vms", &srv.create_body("a"));
    conforms(&doc, "/v1/vms", "POST", r.status, &r.json());
    assert_eq!(r.status, 201);
    let body = serde_json::json!({
        "name": "b",
        "config": {
            "kernel": srv.kernel, "memory": 67108864, "serial": "null", "rng": true,
            "balloon": { "size": "16M" }, "cmdline": "quiet"
        },
        "restart_policy": "always"
    });
    let r = srv.post("/v1/vms", &body.to_string());
    conforms(&doc, "/v1/vms", "POST", r.status, &r.json());
    for (path, method, body) in [
        ("/v1/vms", "POST", Some(&br#"{"name":"a"#[..])),
        (
            "/v1/vms",
            "POST",
            Some(&br#"{"name":"a","config":{"cpus":0}}"#[..]),
        ),
        ("/v1/vms", "POST", Some(srv.create_body("a").as_bytes())),
    ] {
        let r = request(&srv.sock, method, path, body);
        assert!(r.status >= 400);
        conforms(&doc, path, method, r.status, &r.json());
    }
    for path in ["/v1/vms", "/v1/host", "/v1/events"] {
        let r = srv.get(path);
        assert_eq!(r.status, 200);
        conforms(&doc, path, "GET", 200, &r.json());
    }
    let r = srv.get("/v1/vms/b");
    conforms(&doc, "/v1/vms/{vm}", "GET", r.status, &r.json());
    let r = srv.delete("/v1/vms/b");
    assert_eq!(r.status, 200);
    conforms(&doc, "/v1/vms/{vm}", "DELETE", r.status, &r.json());
    let r = srv.delete("/v1/vms/a?force=nope");
    conforms(&doc, "/v1/vms/{vm}", "DELETE", r.status, &r.json());
}

#[test]
fn checked_in_document_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/openapi.json");
    let text = std::fs::read_to_string(&path).expect("docs/api/openapi.json");
    let checked_in: Value = serde_json::from_str(&text).expect("JSON");
    let generated = serde_json::to_value(daemon::api::openapi()).expect("json");
    assert!(
        checked_in == generated,
        "docs/api/openapi.json is out of date; regenerate it with \
         `cargo run -p daemon --example openapi > docs/api/openapi.json`"
    );
}
