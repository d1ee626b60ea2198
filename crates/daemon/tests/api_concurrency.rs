//! 50 concurrent clients listing and querying while others create and delete: every answer is
//! a correct JSON 200/201/404/409, never a 5xx.

mod http;

use http::Server;
use serde_json::Value;
use std::sync::Arc;

#[test]
fn fifty_concurrent_clients_get_correct_answers() {
    const READERS: usize = 40;
    const WRITERS: usize = 10;
    const ROUNDS: usize = 8;
    let srv = Arc::new(Server::start("concurrency"));
    // VMs that stay for the whole test: every listing must show them.
    for i in 0..5 {
        let r = srv.post("/v1/vms", &srv.create_body(&format!("stable-{i}")));
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let barrier = Arc::new(std::sync::Barrier::new(READERS + WRITERS));
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let srv = Arc::clone(&srv);
        let barrier = Arc::clone(&barrier);
        handles.push(std::thread::spawn(move || {
            barrier.wait();
            for i in 0..ROUNDS {
                let own = format!("w{w}-{i}");
                let r = srv.post("/v1/vms", &srv.create_body(&own));
                assert_eq!(r.status, 201, "{}", r.text());
                assert_eq!(r.json()["name"], own.as_str());
                // Every writer races for the same name: exactly one 201, the others 409.
                let contested = format!("contested-{i}");
                let r = srv.post("/v1/vms", &srv.create_body(&contested));
                assert!(matches!(r.status, 201 | 409), "{}", r.text());
                if r.status == 409 {
                    assert_eq!(r.json()["field"], "name");
                }
                // ... and to delete it: one 200, the others 404 (or 404 before it exists).
                let r = srv.delete(&format!("/v1/vms/{contested}"));
                assert!(matches!(r.status, 200 | 404), "{}", r.text());
                let r = srv.delete(&format!("/v1/vms/{own}"));
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }));
    }
    for _ in 0..READERS {
        let srv = Arc::clone(&srv);
        let barrier = Arc::clone(&barrier);
        handles.push(std::thread::spawn(move || {
            barrier.wait();
            for i in 0..ROUNDS {
                let r = srv.get("/v1/vms");
                assert_eq!(r.status, 200, "{}", r.text());
                let list = r.json();
                let names: Vec<&str> = list
                    .as_array()
                    .expect("array")
                    .iter()
                    .filter_map(|v| v["name"].as_str())
                    .collect();
                for s in 0..5 {
                    assert!(names.contains(&format!("stable-{s}").as_str()), "{names:?}");
                }
                let r = srv.get(&format!("/v1/vms/stable-{}", i % 5));
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(r.json()["state"], "created");
                let r = srv.get(&format!("/v1/vms/contested-{i}"));
                assert!(matches!(r.status, 200 | 404), "{}", r.text());
                let v: Value = r.json();
                if r.status == 200 {
                    assert_eq!(v["name"], format!("contested-{i}").as_str());
                } else {
                    assert_eq!(v["field"], "vm");
                }
                let r = srv.get("/v1/events?limit=1000");
                assert_eq!(r.status, 200, "{}", r.text());
                let ids: Vec<i64> = r
                    .json()
                    .as_array()
                    .expect("array")
                    .iter()
                    .filter_map(|e| e["id"].as_i64())
                    .collect();
                assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
            }
        }));
    }
    for h in handles {
        h.join().expect("client thread");
    }
    // All that is left: the stable VMs and the contested ones nobody deleted in time.
    let list = srv.get("/v1/vms").json();
    for v in list.as_array().expect("array") {
        let name = v["name"].as_str().unwrap_or("");
        assert!(
            name.starts_with("stable-") || name.starts_with("contested-"),
            "{name}"
        );
    }
}
