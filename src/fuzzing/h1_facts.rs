//! What an upstream answer holds that the lean HTTP/1.1 client and hyper's client are known
//! to read differently, read independently of both (with httparse and a small chunked-body
//! walker), so the differential in [`super::h1_response`] lets pass exactly those classes
//! of answers and no other.

/// The known differences an answer exhibits (see each field for its class and why it is
/// let pass).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Differences {
    /// Class A (seed h1_response/te-trailing-comma): a `Transfer-Encoding` value that is
    /// not visible ASCII, or whose last list element is empty (`chunked,`). hyper looks at
    /// the text after the last comma of the last line (none when not ASCII), finds no
    /// `chunked`, and reads the body to the close; RFC 9110's list syntax would make
    /// `chunked` last. Readers disagree on such framing, so the lean client refuses it (502):
    /// a stricter refusal.
    pub opaque_transfer_encoding: bool,
    /// Class B (seed h1_response/cl-ignored): a `Content-Length` that hyper never reads
    /// (beside a `Transfer-Encoding`, on a 204 or 304, or answering `HEAD`) and the lean
    /// client checks anyway, refusing a malformed or conflicting one: a stricter refusal.
    pub length_ignored_by_hyper: bool,
    /// Class F (seed h1_response/cl-zeros): a `Content-Length` of more than 19 digits
    /// (leading zeros) that still fits 64 bits: hyper reads it, the lean client refuses
    /// every length that long: a stricter refusal.
    pub long_length: bool,
    /// Class C (seed h1_response/trailers-bare-lf): a bare LF in the trailer section. Hyper
    /// ends trailer lines at CRLF only and lets httparse read the lines, which takes a bare
    /// LF; the lean client refuses it as it does in chunk-size lines: a stricter refusal.
    pub bare_lf_in_trailers: bool,
    /// Class D (seed h1_response/trailers-invalid): a trailer section hyper refuses (a line
    /// that is no `name: value` field, or more than 100 of them). The lean client reads
    /// trailer lines up to the empty line and drops them unread, so it takes the answer
    /// (and may reuse the connection) where hyper fails the body; both end the message at
    /// the same empty line.
    pub trailers_hyper_refuses: bool,
    /// Class E (seed h1_response/http10-te): `Transfer-Encoding` in an HTTP/1.0 answer,
    /// which hyper refuses; the lean client decodes it and never reuses the connection (RFC
    /// 9112 §6.1: process it, then close).
    pub transfer_encoding_in_http10: bool,
}

/// The final head (after interim 1xx answers, as both clients skip them): its length, its
/// status, whether it is HTTP/1.1, and its headers.
struct FinalHead {
    len: usize,
    status: u16,
    http11: bool,
    headers: Vec<(String, Vec<u8>)>,
}

fn final_head(mut answer: &[u8]) -> Option<FinalHead> {
    let mut offset = 0;
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut slots);
        let httparse::Status::Complete(len) = resp.parse(answer).ok()? else {
            return None;
        };
        let status = resp.code?;
        if (100..200).contains(&status) && status != 101 {
            offset += len;
            answer = &answer[len..];
            continue;
        }
        return Some(FinalHead {
            len: offset + len,
            status,
            http11: resp.version == Some(1),
            headers: resp
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        });
    }
}

/// The trailer section of a chunked body starting at `body` (CRLF-delimited chunk lines,
/// as both clients require), as hyper frames it: up to the first CRLF CRLF after the last
/// chunk. `None` when the chunks do not lead there.
fn trailer_section(body: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    loop {
        let line_end = at + body[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = &body[at..line_end];
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return None;
        }
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let size = line[..digits].iter().try_fold(0u64, |n, b| {
            n.checked_mul(16)?
                .checked_add(u64::from((*b as char).to_digit(16)?))
        })?;
        at = line_end + 2;
        if digits == 0 {
            return None;
        }
        if size == 0 {
            // The section starts here: an empty line at once, or lines up to CRLF CRLF.
            let rest = &body[at..];
            if rest.starts_with(b"\r\n") {
                return Some(&rest[..2]);
            }
            let end = rest.windows(4).position(|w| w == b"\r\n\r\n")?;
            return Some(&rest[..end + 4]);
        }
        let data_end = at.checked_add(usize::try_from(size).ok()?)?;
        if body.get(data_end..data_end + 2)? != b"\r\n" {
            return None;
        }
        at = data_end + 2;
    }
}

/// Whether hyper takes `section` as trailers: httparse reads at most 100 fields from it
/// (what follows them is not looked at), whose names and values `http` takes.
fn hyper_takes_trailers(section: &[u8]) -> bool {
    if section == b"\r\n" {
        return true;
    }
    let mut slots = [httparse::EMPTY_HEADER; 100];
    match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => fields.iter().all(|f| {
            http::HeaderName::from_bytes(f.name.as_bytes()).is_ok()
                && http::HeaderValue::from_bytes(f.value).is_ok()
        }),
        _ => false,
    }
}

/// The known differences of `answer` (to a `HEAD` when `head`).
pub fn differences(answer: &[u8], head: bool) -> Differences {
    let Some(h) = final_head(answer) else {
        return Differences::default();
    };
    let values = |name: &'static str| {
        h.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    };
    let has_te = values("transfer-encoding").next().is_some();
    let opaque_transfer_encoding = values("transfer-encoding").any(|v| {
        std::str::from_utf8(v).map_or(true, |s| {
            !s.is_ascii()
                || s.rsplit(',')
                    .next()
                    .is_none_or(|last| last.trim().is_empty())
        })
    });
    let length_ignored_by_hyper = values("content-length").next().is_some()
        && (has_te || head || h.status == 204 || h.status == 304);
    let long_length = values("content-length").any(|v| {
        v.split(|b| *b == b',').any(|item| {
            let item = item.trim_ascii();
            item.len() > 19
                && item.iter().all(u8::is_ascii_digit)
                && item.iter().skip_while(|d| **d == b'0').count() <= 19
        })
    });
    let trailers = (has_te && !head && h.status != 204 && h.status != 304)
        .then(|| trailer_section(&answer[h.len..]))
        .flatten();
    Differences {
        opaque_transfer_encoding,
        length_ignored_by_hyper,
        long_length,
        bare_lf_in_trailers: trailers.is_some_and(|t| {
            t.iter()
                .enumerate()
                .any(|(i, b)| *b == b'\n' && (i == 0 || t[i - 1] != b'\r'))
        }),
        trailers_hyper_refuses: trailers.is_some_and(|t| !hyper_takes_trailers(t)),
        transfer_encoding_in_http10: has_te && !h.http11,
    }
}
