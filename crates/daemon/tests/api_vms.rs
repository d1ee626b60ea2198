//! The API's VM routes: the happy path, and every kind of bad input refused with the field
//! named and nothing changed.

mod http;

use http::{assert_error, Server};
use serde_json::{json, Value};

#[test]
fn create_list_get_delete() {
    let srv = Server::start("happy");
    let r = srv.post("/v1/vms", &srv.create_body("web-1"));
    assert_eq!(r.status, 201, "{}", r.text());
    let vm = r.json();
    let id = vm["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(vm["name"], "web-1");
    assert_eq!(vm["state"], "created");
    assert_eq!(vm["desired_state"], "stopped");
    assert_eq!(vm["restart_policy"], "never");
    assert_eq!(vm["config"]["cpus"], 2);
    assert_eq!(vm["config"]["memory"], "64M");
    assert_eq!(vm["restart_count"], 0);
    assert!(vm.get("pid").is_none() && vm.get("uptime_ms").is_none());

    let body = json!({
        "name": "db",
        "config": { "kernel": srv.kernel, "memory": 134217728, "serial": "null" },
        "restart_policy": "on-failure",
        "start": true
    });
    let r = srv.post("/v1/vms", &body.to_string());
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["restart_policy"], "on-failure");
    // `start` really starts: this kernel is only a header, so the VMM fails and says why; the
    // VM stays defined, crashed with the reason, and wanted stopped (no restart loop).
    assert_eq!(r.json()["state"], "crashed", "{}", r.text());
    assert_eq!(r.json()["desired_state"], "stopped");
    let reason = r.json()["last_exit_reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(reason.starts_with("failed to start"), "{reason}");
    assert_eq!(r.json()["config"]["memory"], "128M");

    let list = srv.get("/v1/vms").json();
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["web-1", "db"]);

    assert_eq!(srv.get("/v1/vms/web-1").json(), vm);
    assert_eq!(srv.get(&format!("/v1/vms/{id}")).json(), vm);

    let events = srv.get("/v1/events").json();
    let kinds: Vec<&str> = events
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    // db: created, then its start failed (crashed, with the reason).
    assert_eq!(kinds, ["created", "created", "crashed"]);
    assert_eq!(events[0]["vm_id"], id.as_str());

    let r = srv.delete(&format!("/v1/vms/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "web-1");
    assert_error(&srv.get("/v1/vms/web-1"), 404, Some("vm"));
    assert_error(&srv.delete("/v1/vms/web-1"), 404, Some("vm"));
    let r = srv.delete("/v1/vms/db?force=false");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(srv.get("/v1/vms").json(), json!([]));
    let events = srv.get("/v1/events?after=3&limit=10").json();
    assert_eq!(events.as_array().map(Vec::len), Some(2));
    assert_eq!(events[0]["kind"], "deleted");
}

#[test]
fn bad_input_is_refused_with_the_field_named_and_nothing_changed() {
    let srv = Server::start("bad");
    let r = srv.post("/v1/vms", &srv.create_body("taken"));
    assert_eq!(r.status, 201, "{}", r.text());
    let before = srv.snapshot();

    let k = srv.kernel.display().to_string();
    let cfg = |extra: Value| {
        let mut c = json!({ "kernel": k, "serial": "null" });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        c
    };
    let create = |name: &str, config: Value| json!({ "name": name, "config": config }).to_string();
    let missing_disk = srv.dir.join("no-such.img");
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "truncated JSON",
            r#"{"name":"a","config":"#.into(),
            400,
            "body",
            "malformed_json",
        ),
        ("not JSON", "name=a".into(), 400, "body", "malformed_json"),
        ("empty body", "".into(), 400, "body", "malformed_json"),
        (
            "trailing data",
            format!("{} x", create("a", cfg(json!({})))),
            400,
            "body",
            "malformed_json",
        ),
        ("not an object", "[]".into(), 400, "body", "invalid_request"),
        (
            "unknown top-level field",
            json!({ "name": "a", "config": cfg(json!({})), "colour": "red" }).to_string(),
            400,
            "colour",
            "invalid_request",
        ),
        (
            "unknown config field",
            create("a", cfg(json!({ "cpu": 2 }))),
            400,
            "config.cpu",
            "invalid_request",
        ),
        (
            "unknown disk field",
            create("a", cfg(json!({ "disks": [{ "path": "/x", "speed": 1 }] }))),
            400,
            "config.disks[0].speed",
            "invalid_request",
        ),
        (
            "wrong type",
            create("a", cfg(json!({ "cpus": "two" }))),
            400,
            "config.cpus",
            "invalid_request",
        ),
        (
            "negative cpus",
            create("a", cfg(json!({ "cpus": -1 }))),
            400,
            "config.cpus",
            "invalid_request",
        ),
        (
            "bad size",
            create("a", cfg(json!({ "memory": "lots" }))),
            400,
            "config.memory",
            "invalid_request",
        ),
        (
            "name not a string",
            json!({ "name": 7, "config": cfg(json!({})) }).to_string(),
            400,
            "name",
            "invalid_request",
        ),
        (
            "missing name",
            json!({ "config": cfg(json!({})) }).to_string(),
            400,
            "name",
            "invalid_request",
        ),
        (
            "missing config",
            json!({ "name": "a" }).to_string(),
            400,
            "config",
            "invalid_request",
        ),
        (
            "bad restart policy",
            json!({ "name": "a", "config": cfg(json!({})), "restart_policy": "sometimes" })
                .to_string(),
            400,
            "restart_policy",
            "invalid_request",
        ),
        (
            "cpu weight 0",
            json!({ "name": "a", "config": cfg(json!({})), "resources": { "cpu_weight": 0 } })
                .to_string(),
            422,
            "resources.cpu_weight",
            "invalid_value",
        ),
        (
            "memory cap below guest memory",
            json!({ "name": "a", "config": cfg(json!({ "memory": "256M" })),
                    "resources": { "memory_max": "128M" } })
            .to_string(),
            422,
            "resources.memory_max",
            "invalid_value",
        ),
        (
            "limits on a host without cgroups (this server has none)",
            json!({ "name": "a", "config": cfg(json!({})), "resources": { "pids_max": 100 } })
                .to_string(),
            422,
            "resources.pids_max",
            "invalid_value",
        ),
        (
            "unknown resource",
            json!({ "name": "a", "config": cfg(json!({})), "resources": { "io_weight": 1 } })
                .to_string(),
            400,
            "resources.io_weight",
            "invalid_request",
        ),
        (
            "0 vCPUs",
            create("a", cfg(json!({ "cpus": 0 }))),
            422,
            "config.cpus",
            "invalid_value",
        ),
        (
            "too many vCPUs",
            create("a", cfg(json!({ "cpus": 100000 }))),
            422,
            "config.cpus",
            "invalid_value",
        ),
        (
            "memory beyond the host",
            create("a", cfg(json!({ "memory": "64T" }))),
            422,
            "config.memory",
            "invalid_value",
        ),
        (
            "memory too small",
            create("a", cfg(json!({ "memory": "1M" }))),
            422,
            "config.memory",
            "invalid_value",
        ),
        (
            "missing kernel file",
            create(
                "a",
                cfg(json!({ "kernel": srv.dir.join("no-such-kernel") })),
            ),
            422,
            "config.kernel",
            "invalid_value",
        ),
        (
            "nothing to boot",
            create("a", json!({ "cpus": 1 })),
            422,
            "config.kernel",
            "invalid_value",
        ),
        (
            "missing disk image",
            create("a", cfg(json!({ "disks": [{ "path": missing_disk }] }))),
            422,
            "config.disks[0].path",
            "invalid_value",
        ),
        (
            "duplicate name",
            srv.create_body("taken"),
            409,
            "name",
            "name_taken",
        ),
        (
            "invalid name",
            srv.create_body("bad name"),
            422,
            "name",
            "invalid_value",
        ),
        (
            "empty name",
            srv.create_body(""),
            422,
            "name",
            "invalid_value",
        ),
        (
            "id-shaped name",
            srv.create_body("0123456789abcdef0123456789abcdef"),
            422,
            "name",
            "invalid_value",
        ),
    ];
    for (what, body, status, field, code) in cases {
        let r = srv.post("/v1/vms", &body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let v = assert_error(&r, status, Some(field));
        assert_eq!(v["code"], code, "{what}: {v}");
        assert_eq!(srv.snapshot(), before, "{what} changed the store");
    }
}

#[test]
fn delete_and_query_errors() {
    let srv = Server::start("del");
    assert_error(&srv.delete("/v1/vms/nope"), 404, Some("vm"));
    assert_error(&srv.get("/v1/vms/nope"), 404, Some("vm"));
    assert_eq!(srv.post("/v1/vms", &srv.create_body("a")).status, 201);
    let before = srv.snapshot();
    assert_error(&srv.delete("/v1/vms/a?force=maybe"), 400, Some("force"));
    assert_error(&srv.delete("/v1/vms/a?forse=true"), 400, Some("forse"));
    assert_error(&srv.get("/v1/events?limit=0"), 400, Some("limit"));
    assert_error(&srv.get("/v1/events?after=x"), 400, Some("after"));
    assert_eq!(srv.snapshot(), before);
}

#[test]
fn unknown_routes_and_methods_answer_json() {
    let srv = Server::start("routes");
    let v = assert_error(&srv.get("/v1/nothing"), 404, None);
    assert_eq!(v["code"], "no_route");
    let v = assert_error(&srv.get("/v2/vms"), 404, None);
    assert_eq!(v["code"], "no_route");
    let v = assert_error(&srv.delete("/v1/vms"), 405, None);
    assert_eq!(v["code"], "method_not_allowed");
    let v = assert_error(&srv.post("/v1/host", "{}"), 405, None);
    assert_eq!(v["code"], "method_not_allowed");
}

/// Found by schemathesis (scripts/api-fuzz.sh): inputs that were answered outside the document.
#[test]
fn odd_paths_queries_and_bodies_answer_as_documented() {
    let srv = Server::start("odd");
    assert_eq!(srv.post("/v1/vms", &srv.create_body("a")).status, 201);
    // A {vm} that is not UTF-8 once decoded names no VM: a JSON 404, not axum's text/plain 400.
    for (method, path) in [
        ("GET", "/v1/vms/%FF"),
        ("DELETE", "/v1/vms/%FF"),
        ("POST", "/v1/vms/%C3%28/start"),
        ("GET", "/v1/vms/%FF/stats"),
    ] {
        let r = http::request(&srv.sock, method, path, None);
        let v = assert_error(&r, 404, Some("vm"));
        assert_eq!(v["code"], "not_found", "{method} {path}: {v}");
    }
    // Query strings are percent-decoded (and a bad escape is refused, naming the parameter).
    let r = srv.get("/v1/events?%6Cimit=%31");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().as_array().map(Vec::len), Some(1));
    assert_error(&srv.get("/v1/events?limit=%FF"), 400, Some("limit"));
    assert_error(&srv.get("/v1/events?limit=%2"), 400, Some("limit"));
    // The shutdown body is optional, and JSON null means the defaults too: the VM's state (not
    // running) is what refuses it.
    for body in ["", " ", "null", "{}"] {
        let r = srv.post("/v1/vms/a/shutdown", body);
        let v = assert_error(&r, 409, Some("state"));
        assert_eq!(v["code"], "conflict", "{body:?}: {v}");
    }
    assert_error(&srv.post("/v1/vms/a/shutdown", "7"), 400, Some("body"));
    assert_error(
        &srv.post("/v1/vms/a/shutdown", r#"{"x":1}"#),
        400,
        Some("x"),
    );
    assert_error(
        &srv.post("/v1/vms/a/shutdown", r#"{"timeout_s":0}"#),
        422,
        Some("timeout_s"),
    );
    let r = srv.delete("/v1/vms/a?%66orce=tru%65");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Found by schemathesis through a TCP bridge: an answer given before the request's body had
/// arrived (a 405, a 404, an action that takes no body) closed the connection under the client
/// still sending it, so a keep-alive client lost its next request (or that answer itself).
#[test]
fn a_body_the_route_does_not_want_keeps_the_connection() {
    use std::io::{Read, Write};
    let srv = Server::start("keepalive");
    let mut s = std::os::unix::net::UnixStream::connect(&srv.sock).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let body = br#"{"a":1}"#;
    for (method, path, status) in [
        ("DELETE", "/v1/vms", 405),
        ("POST", "/v1/vms/nope/start", 404),
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/host", 200),
    ] {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("head");
        // The body comes late, as through a proxy: the server must still be reading.
        std::thread::sleep(std::time::Duration::from_millis(100));
        s.write_all(body)
            .unwrap_or_else(|e| panic!("{method} {path}: body: {e}"));
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let (end, len) = loop {
            let n = s.read(&mut buf).expect("read");
            assert!(
                n > 0,
                "{method} {path}: closed: {}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
                assert!(
                    !head.contains("connection: close"),
                    "{method} {path}: {head}"
                );
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                break (end + 4, len);
            }
        };
        while raw.len() < end + len {
            let n = s.read(&mut buf).expect("read body");
            assert!(n > 0, "{method} {path}: body cut");
            raw.extend_from_slice(&buf[..n]);
        }
        let status_line = String::from_utf8_lossy(&raw[..12]).into_owned();
        assert!(
            status_line.ends_with(&status.to_string()),
            "{method} {path}: {status_line}"
        );
    }
}

#[test]
fn host_reports_flavour_and_capacity() {
    let srv = Server::start("host");
    assert_eq!(srv.post("/v1/vms", &srv.create_body("a")).status, 201);
    let r = srv.get("/v1/host");
    assert_eq!(r.status, 200, "{}", r.text());
    let h = r.json();
    assert!(
        ["hardware", "pvm", "unknown"].contains(&h["kvm_flavour"].as_str().unwrap_or("")),
        "{h}"
    );
    assert!(h["cpus"].as_u64().unwrap_or(0) >= 1, "{h}");
    assert!(h["memory_bytes"].as_u64().unwrap_or(0) > 0, "{h}");
    assert_eq!(h["vms"], 1);
    // A defined VM that never started takes nothing.
    assert_eq!(
        h["in_use"],
        json!({ "vms": 0, "cpus": 0, "memory_bytes": 0 })
    );
    assert_eq!(
        h["kvm_usable"].as_bool(),
        Some(h.get("kvm_error").is_none())
    );
}

#[test]
fn metrics_in_prometheus_text_format() {
    let srv = Server::start("metrics");
    assert_eq!(srv.post("/v1/vms", &srv.create_body("m1")).status, 201);
    let r = srv.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    let text = r.text();
    let mut families = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            families.insert(it.next().unwrap_or("").to_string());
            assert!(matches!(it.next(), Some("gauge" | "counter")), "{line}");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        // name{labels} value
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let name = series.split('{').next().unwrap_or("");
        assert!(families.contains(name), "{line}: no TYPE before it");
    }
    assert!(
        text.contains("ferrovisor_vms{state=\"created\"} 1"),
        "{text}"
    );
    assert!(text.contains("ferrovisor_vm_up{vm=\"m1\""), "{text}");
    assert!(text.contains("ferrovisor_events_total 1"), "{text}");
}
