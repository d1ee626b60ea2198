//! The HTTP/1.1 wire format, as much of it as the daemon's API needs: writing a request,
//! reading a response head, and reading its body whatever its framing (`Content-Length`,
//! `Transfer-Encoding: chunked`, or until the connection closes). Generic over `Read`/`Write`
//! so it is tested on byte slices.

use std::io::{self, BufRead, Read, Write};

/// Longest response head accepted (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Longest body read into memory (a whole VM list is far smaller).
pub const MAX_BODY: u64 = 64 * 1024 * 1024;

/// A request to write.
pub struct Request<'a> {
    /// `GET`, `POST`, `DELETE`.
    pub method: &'a str,
    /// Path and query, already escaped.
    pub target: &'a str,
    /// Extra headers (name, value).
    pub headers: &'a [(&'a str, &'a str)],
    /// A JSON body.
    pub body: Option<&'a [u8]>,
    /// Whether to ask the server to close the connection after answering (every request but the
    /// console upgrade).
    pub close: bool,
}

impl Request<'_> {
    /// The request's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: ferrovisor/{}\r\n",
            self.method,
            self.target,
            env!("CARGO_PKG_VERSION")
        );
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        for (k, v) in self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        match self.body {
            Some(b) => {
                head.push_str("Content-Type: application/json\r\n");
                head.push_str(&format!("Content-Length: {}\r\n", b.len()));
            }
            None if self.method != "GET" => head.push_str("Content-Length: 0\r\n"),
            None => {}
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(b) = self.body {
            bytes.extend_from_slice(b);
        }
        bytes
    }

    /// Writes the request.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.to_bytes())?;
        w.flush()
    }
}

/// A response's status line and headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// Headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn is_chunked(&self) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == "transfer-encoding")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("chunked"))
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one line ending in `\n` (the `\r\n` or `\n` stripped), at most `limit` bytes; an
/// error at end of input.
fn read_line(r: &mut impl BufRead, limit: usize) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed before a complete answer",
        ));
    }
    if line.last() != Some(&b'\n') {
        if line.len() > limit {
            return Err(bad("a response line is too long"));
        }
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed in the middle of an answer",
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| bad("a response line is not UTF-8"))
}

/// Reads a response head: the status line and the headers up to the blank line. Nothing of
/// the body is consumed. Interim `1xx` answers other than `101` are skipped.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    loop {
        let head = read_one_head(r)?;
        if head.status >= 200 || head.status == 101 {
            return Ok(head);
        }
    }
}

fn read_one_head(r: &mut impl BufRead) -> io::Result<Head> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(r, budget)?;
    budget = budget.saturating_sub(status_line.len() + 2);
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP/1.x answer: {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| bad(format!("bad status line: {status_line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        if budget == 0 {
            return Err(bad("the response head is too long"));
        }
        let line = read_line(r, budget)?;
        budget = budget.saturating_sub(line.len() + 2);
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line: {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Head {
        status,
        reason,
        headers,
    })
}

/// A response body, framed as its head says; reads return end of input at its end.
pub enum Body<R> {
    /// `Content-Length`: this many bytes left.
    Length(R, u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(Chunked<R>),
    /// No framing: the body ends when the connection closes.
    UntilClose(R),
}

impl<R: BufRead> Body<R> {
    /// The body that follows `head` on `r`.
    pub fn new(head: &Head, r: R) -> io::Result<Body<R>> {
        if head.status == 204 || head.status == 304 || head.status < 200 {
            return Ok(Body::Length(r, 0));
        }
        if head.is_chunked() {
            return Ok(Body::Chunked(Chunked::new(r)));
        }
        match head.header("content-length") {
            Some(v) => {
                let n = v
                    .parse::<u64>()
                    .map_err(|_| bad(format!("bad Content-Length: {v:?}")))?;
                Ok(Body::Length(r, n))
            }
            None => Ok(Body::UntilClose(r)),
        }
    }

    /// Reads the whole body (at most [`MAX_BODY`] bytes).
    pub fn read_all(mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let n = self.by_ref().take(MAX_BODY + 1).read_to_end(&mut out)?;
        if n as u64 > MAX_BODY {
            return Err(bad("the response body is too large"));
        }
        Ok(out)
    }
}

impl<R: BufRead> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Length(r, left) => {
                if *left == 0 || buf.is_empty() {
                    return Ok(0);
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = r.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed before the end of the answer",
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            Body::Chunked(c) => c.read(buf),
            Body::UntilClose(r) => r.read(buf),
        }
    }
}

/// Decodes `Transfer-Encoding: chunked`. It reads no further than the caller asks: the end of
/// one chunk is not followed by a wait for the next, so a stream (server-sent events) gets
/// each chunk as it arrives.
pub struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    /// Whether the CRLF after a finished chunk is still to be read.
    crlf_due: bool,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    /// A decoder over `inner`, positioned at the first chunk-size line.
    pub fn new(inner: R) -> Chunked<R> {
        Chunked {
            inner,
            left: 0,
            crlf_due: false,
            done: false,
        }
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        if self.crlf_due {
            let line = read_line(&mut self.inner, 2)?;
            if !line.is_empty() {
                return Err(bad("chunked body: no CRLF after a chunk"));
            }
            self.crlf_due = false;
        }
        let line = read_line(&mut self.inner, 1024)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let n = u64::from_str_radix(size, 16)
            .map_err(|_| bad(format!("chunked body: bad chunk size {line:?}")))?;
        if n == 0 {
            // Trailers, up to the blank line.
            loop {
                if read_line(&mut self.inner, MAX_HEAD)?.is_empty() {
                    break;
                }
            }
            self.done = true;
        }
        self.left = n;
        Ok(())
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left == 0 {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed in the middle of a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            self.crlf_due = true;
        }
        Ok(n)
    }
}

/// Escapes one path segment (a VM's name or id): everything but `A-Z a-z 0-9 - . _ ~` is
/// percent-encoded, so a name can never change the route.
pub fn escape_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // `.` and `..` as a whole segment would be normalised away by a server.
    match out.as_str() {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => out,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::BufReader;

    /// A reader that hands out at most `step` bytes per read: how a socket splits an answer.
    pub(crate) struct Trickle<'a> {
        pub data: &'a [u8],
        pub step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn parse(raw: &[u8], step: usize) -> io::Result<(Head, Vec<u8>)> {
        let mut r = BufReader::with_capacity(7, Trickle { data: raw, step });
        let head = read_head(&mut r)?;
        let body = Body::new(&head, r)?.read_all()?;
        Ok((head, body))
    }

    #[test]
    fn request_bytes() {
        let body = br#"{"timeout_s":5}"#;
        let req = Request {
            method: "POST",
            target: "/v1/vms/web-1/shutdown",
            headers: &[],
            body: Some(body),
            close: true,
        };
        let text = String::from_utf8(req.to_bytes()).unwrap();
        assert!(text.starts_with("POST /v1/vms/web-1/shutdown HTTP/1.1\r\nHost: localhost\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.contains("\r\nContent-Length: 15\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"timeout_s\":5}"));

        let get = Request {
            method: "GET",
            target: "/v1/vms",
            headers: &[],
            body: None,
            close: true,
        };
        let text = String::from_utf8(get.to_bytes()).unwrap();
        assert!(!text.contains("Content-Length"), "{text}");
        let post = Request {
            method: "POST",
            target: "/v1/vms/a/kill",
            headers: &[],
            body: None,
            close: true,
        };
        let text = String::from_utf8(post.to_bytes()).unwrap();
        assert!(text.contains("Content-Length: 0\r\n"), "{text}");
    }

    #[test]
    fn content_length_response() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 7\r\n\r\n[1,2,3]trailing";
        for step in [1, 3, 1000] {
            let (head, body) = parse(raw, step).unwrap();
            assert_eq!(head.status, 200);
            assert_eq!(head.reason, "OK");
            assert_eq!(head.header("content-type"), Some("application/json"));
            assert_eq!(body, b"[1,2,3]");
        }
    }

    #[test]
    fn chunked_response() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[1,2\r\na;ext=1\r\n,3,4,5,6,7\r\n1\r\n]\r\n0\r\nX-Trailer: y\r\n\r\n";
        for step in [1, 2, 5, 1000] {
            let (head, body) = parse(raw, step).unwrap();
            assert_eq!(head.status, 200);
            assert_eq!(String::from_utf8(body).unwrap(), "[1,2,3,4,5,6,7]");
        }
    }

    #[test]
    fn bad_chunk_size_is_an_error() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n";
        let e = parse(raw, 100).unwrap_err();
        assert!(e.to_string().contains("bad chunk size"), "{e}");
    }

    #[test]
    fn api_error_response() {
        let json = r#"{"error":"name web-1 is taken","field":"name","reason":"is taken","code":"name_taken"}"#;
        let raw = format!(
            "HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        );
        let (head, body) = parse(raw.as_bytes(), 4).unwrap();
        assert_eq!(head.status, 409);
        assert!(!head.is_success());
        let e: api::ApiError = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.error, "name web-1 is taken");
        assert_eq!(e.code, "name_taken");
        assert_eq!(e.field.as_deref(), Some("name"));
    }

    #[test]
    fn body_until_close_and_truncated_bodies() {
        let (_, body) = parse(b"HTTP/1.0 200 OK\r\n\r\nabc", 2).unwrap();
        assert_eq!(body, b"abc");
        let e = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = parse(b"HTTP/1.1 200 OK\r\nContent-Le", 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = parse(b"", 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = parse(b"SSH-2.0-OpenSSH\r\n\r\n", 2).unwrap_err();
        assert!(e.to_string().contains("not an HTTP/1.x answer"), "{e}");
    }

    #[test]
    fn interim_answers_are_skipped_but_101_is_kept() {
        let (head, body) = parse(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            3,
        )
        .unwrap();
        assert_eq!(head.status, 204);
        assert!(body.is_empty());
        let mut r = BufReader::new(
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ferrovisor-console\r\n\r\nhello"[..],
        );
        let head = read_head(&mut r).unwrap();
        assert_eq!(head.status, 101);
        assert_eq!(head.header("upgrade"), Some("ferrovisor-console"));
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "hello");
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(escape_segment("web-1"), "web-1");
        assert_eq!(escape_segment("a.b_c~d"), "a.b_c~d");
        assert_eq!(escape_segment("a b/c?d#e%"), "a%20b%2Fc%3Fd%23e%25");
        assert_eq!(escape_segment(".."), "%2E%2E");
        assert_eq!(escape_segment("."), "%2E");
        assert_eq!(escape_segment("é"), "%C3%A9");
        assert_eq!(escape_segment(""), "");
    }
}
