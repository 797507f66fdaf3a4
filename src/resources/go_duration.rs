//! Go's duration syntax, exactly as `time.ParseDuration` reads it.
//!
//! `spec.ttl` is a Go duration because that is what Kubernetes objects carry and what the
//! apiserver's CEL `duration()` parses when it checks the CRD's rule. kube's own parser
//! (`kube::core::Duration::from_str`) is looser: it takes `1h0`, `+-1h` and `1h+2m`, and panics
//! on `1h-2m` or a value past the range. Reading a ttl through [`parse`] first makes the
//! embedded store refuse exactly what a cluster refuses, and keeps a malformed value from ever
//! reaching kube's parser.

use serde::{Deserialize, Deserializer};

/// Why a string is not a Go duration, worded like Go's own errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDuration {
    /// Not of the form `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or out of Go's range.
    #[error("time: invalid duration {0:?}")]
    Syntax(String),
    /// A number without a unit, such as `1h0`.
    #[error("time: missing unit in duration {0:?}")]
    MissingUnit(String),
    /// A unit Go does not know, such as `d`.
    #[error("time: unknown unit {unit:?} in duration {input:?}")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
        /// The whole duration as written.
        input: String,
    },
}

/// Nanoseconds per unit, as Go's `unitMap` has them.
fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        // U+00B5 micro sign and U+03BC Greek mu, as Go accepts both.
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

const LIMIT: u64 = 1 << 63;

/// Parses `input` as Go's `time.ParseDuration` does, to signed nanoseconds (Go's range: a
/// positive duration is at most `i64::MAX` nanoseconds, about 292 years).
pub fn parse(input: &str) -> Result<i64, InvalidDuration> {
    let syntax = || InvalidDuration::Syntax(input.to_owned());
    let (negative, mut s) = match input.as_bytes().first() {
        Some(b'-') => (true, &input[1..]),
        Some(b'+') => (false, &input[1..]),
        _ => (false, input),
    };
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(syntax());
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        if !s.starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
            return Err(syntax());
        }
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let mut whole: u64 = 0;
        for d in s[..int_len].bytes() {
            whole = whole
                .checked_mul(10)
                .and_then(|w| w.checked_add(u64::from(d - b'0')))
                .filter(|w| *w <= LIMIT)
                .ok_or_else(syntax)?;
        }
        s = &s[int_len..];
        // The fraction: digits past what a u64 holds are dropped, as Go's leadingFraction does.
        let (mut frac, mut scale, mut frac_len) = (0u64, 1f64, 0usize);
        if let Some(rest) = s.strip_prefix('.') {
            frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let mut overflow = false;
            for d in rest[..frac_len].bytes() {
                if overflow {
                    continue;
                }
                match frac
                    .checked_mul(10)
                    .and_then(|f| f.checked_add(u64::from(d - b'0')))
                    .filter(|f| *f <= LIMIT)
                {
                    Some(f) => {
                        frac = f;
                        scale *= 10.0;
                    }
                    None => overflow = true,
                }
            }
            s = &rest[frac_len..];
        }
        if int_len == 0 && frac_len == 0 {
            return Err(syntax());
        }
        let unit_len = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if unit_len == 0 {
            return Err(InvalidDuration::MissingUnit(input.to_owned()));
        }
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        let per = unit_nanos(unit).ok_or_else(|| InvalidDuration::UnknownUnit {
            unit: unit.to_owned(),
            input: input.to_owned(),
        })?;
        if whole > LIMIT / per {
            return Err(syntax());
        }
        let mut value = whole * per;
        if frac > 0 {
            // Go computes the fraction in float64 too, so that fractions of hours are exact to
            // the nanosecond; the cast truncates as Go's conversion does.
            value += (frac as f64 * (per as f64 / scale)) as u64;
            if value > LIMIT {
                return Err(syntax());
            }
        }
        total = total
            .checked_add(value)
            .filter(|t| *t <= LIMIT)
            .ok_or_else(syntax)?;
    }
    if negative {
        // -(2^63) is i64::MIN, the one magnitude that only fits negated.
        Ok(0i64.wrapping_sub_unsigned(total))
    } else {
        i64::try_from(total).map_err(|_| syntax())
    }
}

/// Reads an optional Go duration (`spec.ttl`): refuses what [`parse`] refuses, and builds the
/// value from Go's exact nanoseconds, so a duration Go reads as zero (`0.1ns`) is zero here too.
pub fn deserialize_option<'de, D>(deserializer: D) -> Result<Option<kube::core::Duration>, D::Error>
where
    D: Deserializer<'de>,
{
    let Some(raw) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let nanos = parse(&raw).map_err(serde::de::Error::custom)?;
    match u64::try_from(nanos) {
        Ok(n) => Ok(Some(std::time::Duration::from_nanos(n).into())),
        // kube's Duration has no negative constructor; its parser is safe on what Go accepts
        // (one leading sign, Go's range) and keeps the sign, which is all validation reads.
        Err(_) => raw.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000_000_000;

    #[test]
    fn reads_what_go_reads() {
        for (s, want) in [
            ("0", 0),
            ("-0", 0),
            ("+0", 0),
            ("0s", 0),
            ("90m", 90 * 60_000_000_000),
            ("1h30m", H + 30 * 60_000_000_000),
            ("1.5h", H + H / 2),
            (".5h", H / 2),
            ("1.h", H),
            ("+1h", H),
            ("-1h", -H),
            ("1µs", 1_000),
            ("1μs", 1_000),
            ("1us2ns", 1_002),
            ("0.1ns", 0),
            ("0.0000000001h", 360),
            ("9223372036854775807ns", i64::MAX),
            ("2562047h47m16.854775807s", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
        ] {
            assert_eq!(parse(s), Ok(want), "{s:?}");
        }
    }

    /// Every one of these is accepted by kube's parser (or panics it); Go refuses them all.
    #[test]
    fn refuses_what_go_refuses() {
        for s in [
            "",
            "+",
            "-",
            "banana",
            "1",
            "1h0",
            "+-1h",
            "--1h",
            "1h+2m",
            "1h-2m",
            ".h",
            "1d",
            "1 h",
            " 1h",
            "1H",
            "1e3s",
            "inf",
            "NaN",
            "9223372036854775808ns",
            "2562048h",
            "99999999999999999999h",
            "1.5.5h",
        ] {
            assert!(parse(s).is_err(), "{s:?} should be refused");
        }
    }

    #[test]
    fn a_ttl_that_would_panic_kube_is_a_decode_error() {
        #[derive(Debug, serde::Deserialize)]
        struct T {
            #[serde(default, deserialize_with = "deserialize_option")]
            ttl: Option<kube::core::Duration>,
        }
        for bad in ["1h-2m", "99999999999999999999h", "banana"] {
            let r = serde_json::from_value::<T>(serde_json::json!({ "ttl": bad }));
            assert!(r.is_err(), "{bad:?}");
        }
        let ok = serde_json::from_value::<T>(serde_json::json!({ "ttl": "-1h" }));
        assert!(ok.is_ok_and(|t| t.ttl.is_some_and(|d| d.is_negative())));
        let null = serde_json::from_value::<T>(serde_json::json!({ "ttl": null }));
        assert!(null.is_ok_and(|t| t.ttl.is_none()));
    }
}
