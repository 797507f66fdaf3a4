//! The agent's HTTP subset ([`crate::agent::http`]) and its `/proc/net` parser
//! ([`crate::agent::proc_net`]): what the agent reads from previewd, what previewd reads
//! from an agent (whose container a tenant controls), and what the agent reads from the
//! kernel.
//!
//! Properties of the HTTP subset: the two head readers never panic, never return more than
//! their limit, agree with each other whatever the reads' sizes, and split the stream at
//! the first empty line without losing a byte; a head the strict parser accepts is one
//! httparse reads the same way (method, target, status, header values), so the agent never
//! understands a request differently from a standard server. Of `/proc/net`: a line that
//! parses is a LISTEN socket whose local address field is exactly the parsed address and
//! port in the kernel's notation, and normalizing is sorted, deduplicated and idempotent.

use crate::agent::http::{
    HeadError, RequestHead, ResponseHead, read_head_buffered, read_head_exact,
};
use crate::agent::proc_net::{normalize, parse_line, parse_table};

use super::drive::{AtEnd, MemIo, escaped, run};

/// A head reader's outcome, comparable.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Head(Vec<u8>),
    TooLarge,
    Eof,
}

fn outcome(r: Result<Vec<u8>, HeadError>) -> Read {
    match r {
        Ok(head) => Read::Head(head),
        Err(HeadError::TooLarge { .. }) => Read::TooLarge,
        Err(HeadError::Eof) => Read::Eof,
        Err(e) => panic!("an in-memory read failed: {e}"),
    }
}

/// The harness for the HTTP subset: byte 0 sets the size of each read (1-256), byte 1 the
/// head limit (16-4096), the rest is the stream. Panics when a property in the module doc
/// fails.
pub fn agent_http(data: &[u8]) {
    let [chunk, limit, stream @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk) + 1;
    let limit = (usize::from(*limit) + 1) * 16;
    let context = || format!("chunk {chunk}, limit {limit}, {}", escaped(stream));

    let mut io = MemIo::new(stream.to_vec(), chunk, AtEnd::Eof);
    let buffered = run(read_head_buffered(&mut io, limit))
        .unwrap_or_else(|| panic!("a reader waited at end of file: {}", context()));
    let (buffered, rest) = match buffered {
        Ok((head, rest)) => (Read::Head(head), rest),
        Err(e) => (outcome(Err(e)), Vec::new()),
    };
    let mut io = MemIo::new(stream.to_vec(), chunk, AtEnd::Eof);
    let exact = outcome(
        run(read_head_exact(&mut io, limit))
            .unwrap_or_else(|| panic!("a reader waited at end of file: {}", context())),
    );
    assert_eq!(buffered, exact, "the two readers disagree: {}", context());

    // Where the head ends: the first empty line, within the limit, or none.
    let first_end = stream
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    match (&exact, first_end) {
        (Read::Head(head), Some(end)) => {
            assert!(end <= limit, "{}", context());
            assert_eq!(head[..], stream[..end], "{}", context());
            assert_eq!(io.consumed(), end, "the exact reader read past the head");
            // What the buffered reader read past the head is the stream's next bytes.
            assert!(stream[end..].starts_with(&rest), "{}", context());
            check_parsers(head);
        }
        (Read::TooLarge, end) => assert!(
            end.is_none_or(|e| e > limit) && (end.is_some() || stream.len() >= limit),
            "{}",
            context()
        ),
        (Read::Eof, None) => assert!(stream.len() < limit, "{}", context()),
        (read, end) => panic!("{read:?} with the head ending at {end:?}: {}", context()),
    }
    // The parsers take any bytes, heads or not.
    check_parsers(stream);
}

/// A head the agent's parsers accept, compared with httparse's reading of it (given room
/// for every line: the agent bounds a head by bytes, not by lines).
fn check_parsers(head: &[u8]) {
    let lines = head.iter().filter(|b| **b == b'\n').count();
    if let Ok(req) = RequestHead::parse(head) {
        let mut slots = vec![httparse::EMPTY_HEADER; lines];
        let mut std = httparse::Request::new(&mut slots);
        let parsed = std.parse(head);
        assert_eq!(
            parsed,
            Ok(httparse::Status::Complete(head.len())),
            "the agent accepts a request httparse does not: {}",
            escaped(head)
        );
        assert_eq!(std.method, Some(req.method.as_str()), "{}", escaped(head));
        assert_eq!(std.path, Some(req.target.as_str()), "{}", escaped(head));
        same_headers(std.headers, |n| req.header(n), head);
    }
    if let Ok(resp) = ResponseHead::parse(head) {
        let mut slots = vec![httparse::EMPTY_HEADER; lines];
        let mut std = httparse::Response::new(&mut slots);
        let parsed = std.parse(head);
        assert_eq!(
            parsed,
            Ok(httparse::Status::Complete(head.len())),
            "the agent accepts a response httparse does not: {}",
            escaped(head)
        );
        assert_eq!(std.code, Some(resp.status), "{}", escaped(head));
        same_headers(std.headers, |n| resp.header(n), head);
    }
}

/// Each header httparse found reads the same through the agent's lookup (the first of a
/// name, without the whitespace around it).
fn same_headers<'h>(
    std: &[httparse::Header<'_>],
    lookup: impl Fn(&str) -> Option<&'h str>,
    head: &[u8],
) {
    for h in std {
        let first = std
            .iter()
            .find(|o| o.name.eq_ignore_ascii_case(h.name))
            .map(|o| unicode_trimmed(o.value.trim_ascii()));
        assert_eq!(
            lookup(h.name).map(str::as_bytes),
            first,
            "header {:?} reads differently: {}",
            h.name,
            escaped(head)
        );
    }
}

/// Known difference (seed agent_http/utf8): the agent trims header values with
/// `str::trim`, which also takes Unicode whitespace (U+00A0, U+2000-U+200A, U+3000, …) off
/// their ends, where HTTP (and httparse) trims only spaces and tabs: `X: \u{a0}v` reads
/// `v` in the agent. The agent's values are its secret and lengths previewd itself sends, so
/// only that trimming is let pass here; every other byte must read as httparse reads it.
fn unicode_trimmed(value: &[u8]) -> &[u8] {
    std::str::from_utf8(value).map_or(value, |v| v.trim().as_bytes())
}

/// The kernel's notation of a local address: hex words of the address as it lies in
/// memory, then the port in big-endian hex.
fn kernel_notation(p: &crate::agent::ListeningPort) -> String {
    let words = match p.address {
        std::net::IpAddr::V4(a) => vec![a.octets()],
        std::net::IpAddr::V6(a) => a
            .octets()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
    };
    let mut out: String = words
        .into_iter()
        .map(|w| format!("{:08X}", u32::from_ne_bytes(w)))
        .collect();
    out.push_str(&format!(":{:04X}", p.port));
    out
}

/// The harness for `/proc/net/tcp{,6}`: `data` is a table. Panics when a property in the
/// module doc fails.
pub fn proc_net(data: &[u8]) {
    let table = String::from_utf8_lossy(data);
    for line in table.lines() {
        let Some(p) = parse_line(line) else {
            continue;
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.get(3), Some(&"0A"), "not a LISTEN line: {line:?}");
        assert_eq!(
            fields.get(1).map(|f| f.to_ascii_uppercase()),
            Some(kernel_notation(&p)),
            "{line:?} parsed as {p:?}"
        );
    }
    let ports: Vec<_> = parse_table(&table).collect();
    assert!(ports.len() <= table.lines().count());
    let normal = normalize(ports.clone());
    assert!(
        normal
            .windows(2)
            .all(|w| (w[0].port, w[0].address) < (w[1].port, w[1].address)),
        "{normal:?}"
    );
    assert!(ports.iter().all(|p| normal.contains(p)));
    assert_eq!(normalize(normal.clone()), normal);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_run_http() {
        super::super::mutate::bounded_run("agent_http", agent_http, HTTP_DICTIONARY);
    }

    #[test]
    fn bounded_run_proc_net() {
        super::super::mutate::bounded_run("proc_net", proc_net, PROC_NET_DICTIONARY);
    }

    /// Pieces of the agent protocol's heads.
    const HTTP_DICTIONARY: &[&[u8]] = &[
        b"\r\n",
        b"\r\n\r\n",
        b"CONNECT 127.0.0.1:3000 HTTP/1.1\r\n",
        b"GET /v1/health HTTP/1.1\r\n",
        b"HTTP/1.1 200 Connection established\r\n",
        b"x-previewd-agent-secret: ",
        b"Content-Length: ",
        b": ",
        b" ",
        b"\t",
        b"HTTP/1.0",
    ];

    /// Pieces of socket tables.
    const PROC_NET_DICTIONARY: &[&[u8]] = &[
        b"\n",
        b" 0A ",
        b" 01 ",
        b":",
        b"0100007F",
        b"00000000000000000000000001000000",
        b"FFFF",
        b"   0: ",
    ];
}
