//! Server-sent events (`text/event-stream`): each event is `field: value` lines ended by a
//! blank line; `data` lines are joined with `\n`; lines starting with `:` are comments (the
//! daemon's keep-alives).

use std::io::{self, BufRead};

/// Longest line accepted (an event's JSON is far smaller).
const MAX_LINE: u64 = 1024 * 1024;

/// One event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `id:`, when given.
    pub id: Option<String>,
    /// `event:` (the type), when given.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Reads events from a stream, each returned as soon as its blank line arrives.
pub struct SseReader<R> {
    inner: R,
}

impl<R: BufRead> SseReader<R> {
    /// A reader over `inner` (the response body).
    pub fn new(inner: R) -> SseReader<R> {
        SseReader { inner }
    }

    /// The next event; `None` when the stream ends (an unfinished event at the end is dropped,
    /// as the format says).
    pub fn next_event(&mut self) -> io::Result<Option<SseEvent>> {
        let mut ev = SseEvent::default();
        let mut has_data = false;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = io::Read::take(&mut self.inner, MAX_LINE).read_until(b'\n', &mut line)?;
            if n == 0 {
                return Ok(None);
            }
            if line.last() != Some(&b'\n') {
                if n as u64 >= MAX_LINE {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "event stream: a line is too long",
                    ));
                }
                // The stream ended in the middle of a line.
                return Ok(None);
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                if has_data {
                    return Ok(Some(ev));
                }
                // A blank line with no data (after a comment, or an id alone): nothing to hand
                // out.
                ev = SseEvent::default();
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            if text.starts_with(':') {
                continue;
            }
            let (field, value) = match text.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (text.as_ref(), ""),
            };
            match field {
                "data" => {
                    if has_data {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                    has_data = true;
                }
                "event" => ev.event = Some(value.to_string()),
                "id" => ev.id = Some(value.to_string()),
                _ => {} // `retry` and unknown fields
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::http::tests::Trickle;
    use crate::cli::http::{read_head, Body};
    use std::io::BufReader;

    const STREAM: &[u8] = b": keep-alive\n\nid: 7\nevent: started\ndata: {\"id\":7,\"at\":1,\"kind\":\"started\",\"detail\":{}}\n\n:\n\r\nid: 8\r\nevent: stopped\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\nid: 9\ndata: partial";

    fn all(r: impl BufRead) -> Vec<SseEvent> {
        let mut sse = SseReader::new(r);
        let mut out = Vec::new();
        while let Some(e) = sse.next_event().unwrap() {
            out.push(e);
        }
        out
    }

    fn check(events: &[SseEvent]) {
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].id.as_deref(), Some("7"));
        assert_eq!(events[0].event.as_deref(), Some("started"));
        let e: api::Event = serde_json::from_str(&events[0].data).unwrap();
        assert_eq!(e.id, 7);
        assert_eq!(events[1].id.as_deref(), Some("8"));
        assert_eq!(events[1].event.as_deref(), Some("stopped"));
        assert_eq!(events[1].data, "{\"a\":\n1}");
    }

    #[test]
    fn events_split_across_reads() {
        for step in [1, 2, 3, 7, 4096] {
            let r = BufReader::with_capacity(5, Trickle { data: STREAM, step });
            check(&all(r));
        }
    }

    #[test]
    fn events_inside_a_chunked_body() {
        // The daemon's stream: chunked, one chunk per event, chunk boundaries mid-line too.
        let mut raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for piece in STREAM.chunks(11) {
            raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            raw.extend_from_slice(piece);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        for step in [1, 5, 4096] {
            let mut r = BufReader::with_capacity(6, Trickle { data: &raw, step });
            let head = read_head(&mut r).unwrap();
            let body = Body::new(&head, r).unwrap();
            check(&all(BufReader::new(body)));
        }
    }

    #[test]
    fn each_event_is_handed_out_without_waiting_for_the_next() {
        // A reader that fails if asked for more than the first event: the reader must not
        // read ahead.
        struct Then<'a>(&'a [u8]);
        impl io::Read for Then<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::other("read past the first event"));
                }
                let n = buf.len().min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut sse = SseReader::new(BufReader::new(Then(b"id: 1\ndata: {}\n\n")));
        let e = sse.next_event().unwrap().unwrap();
        assert_eq!(e.data, "{}");
    }
}
