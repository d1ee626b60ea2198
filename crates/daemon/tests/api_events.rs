//! The server-sent event stream sees what the API writes.

mod http;

use http::Server;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn read_until(s: &mut UnixStream, buf: &mut Vec<u8>, needle: &str, deadline: Instant) -> bool {
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        if String::from_utf8_lossy(buf).contains(needle) {
            return true;
        }
        match s.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    String::from_utf8_lossy(buf).contains(needle)
}

#[test]
fn stream_receives_created_and_deleted() {
    let srv = Server::start("sse");
    // An event from before the stream opened is not replayed (the default start is "now").
    assert_eq!(srv.post("/v1/vms", &srv.create_body("before")).status, 201);

    let mut s = UnixStream::connect(&srv.sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    s.write_all(b"GET /v1/events/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    assert!(
        read_until(&mut s, &mut buf, "\r\n\r\n", deadline),
        "no headers"
    );
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");

    let r = srv.post("/v1/vms", &srv.create_body("streamed"));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_string();
    assert!(
        read_until(&mut s, &mut buf, "event: created", deadline),
        "no created event: {}",
        String::from_utf8_lossy(&buf)
    );
    assert!(read_until(&mut s, &mut buf, &id, deadline));
    assert_eq!(srv.delete("/v1/vms/streamed").status, 200);
    assert!(
        read_until(&mut s, &mut buf, "event: deleted", deadline),
        "no deleted event: {}",
        String::from_utf8_lossy(&buf)
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        !text.contains("\"before\""),
        "replayed an old event: {text}"
    );
}

#[test]
fn stream_resumes_after_an_id() {
    let srv = Server::start("sse-after");
    assert_eq!(srv.post("/v1/vms", &srv.create_body("one")).status, 201);
    assert_eq!(srv.post("/v1/vms", &srv.create_body("two")).status, 201);
    let mut s = UnixStream::connect(&srv.sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    s.write_all(b"GET /v1/events/stream?after=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    assert!(read_until(&mut s, &mut buf, "id: 2", deadline));
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.contains("\"two\"") && !text.contains("\"one\""),
        "{text}"
    );
}
