//! Arvados' config value syntaxes that YAML does not have natively: Go-style durations
//! (`10s`, `1m30s`, `1h2m3.5s`) and byte sizes (`550MiB`, `16GB`, `1.5GiB`, plain integers).
//!
//! Parsing is pure; the `serde` adaptors at the bottom turn a parse failure into a
//! deserialization error, which the loader decorates with the full key path.

use std::fmt;
use std::time::Duration;

/// Parse a Go `time.ParseDuration` string. Negative durations are rejected: no setting the
/// dispatcher reads has a meaning for them.
///
/// ```
/// use std::time::Duration;
/// use arvados::config::units::parse_duration;
///
/// assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert!(parse_duration("10").is_err()); // a unit is required
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {s:?}");
    let body = s.strip_prefix('+').unwrap_or(s);
    if let Some(magnitude) = body.strip_prefix('-') {
        // "-0s" is still zero in Go; anything else is negative.
        return match parse_duration(magnitude) {
            Ok(d) if d.is_zero() => Ok(d),
            Ok(_) => Err(format!("invalid duration {s:?}: must not be negative")),
            Err(_) => Err(invalid()),
        };
    }
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    if body.is_empty() {
        return Err(invalid());
    }
    let mut rest = body;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        // Number: digits, optional fraction.
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &rest[..int_len];
        rest = &rest[int_len..];
        let mut frac_part = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        // Unit: everything up to the next digit or '.'.
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            "" => return Err(format!("invalid duration {s:?}: missing unit")),
            _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
        };
        let int_val: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        let mut nanos = int_val.checked_mul(unit_nanos).ok_or_else(invalid)?;
        // Fraction: scale digit by digit so that "1.5h" is exact.
        let mut scale = unit_nanos;
        for d in frac_part.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos += u128::from(d - b'0') * scale;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(invalid)?;
    }
    // Go's limit (a signed 64-bit count of nanoseconds, about 292 years): Arvados itself
    // rejects more, and deadlines computed from it stay representable.
    if total_nanos > i64::MAX as u128 {
        return Err(format!(
            "invalid duration {s:?}: longer than the maximum 2562047h47m16.854775807s"
        ));
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| invalid())?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

/// Format a duration the way Go's `time.Duration.String()` does (`1m0s`, `1.5s`, `300ms`, `0s`),
/// so that `check-config` output reads like Arvados' own.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos < 1_000_000_000 {
        let (unit, div) = if nanos < 1_000 {
            ("ns", 1)
        } else if nanos < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", fraction(nanos, div));
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let sec_nanos = nanos % 60_000_000_000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&format!("{}s", fraction(sec_nanos, 1_000_000_000)));
    out
}

/// `value / div` as a decimal without trailing zeros.
fn fraction(value: u128, div: u128) -> String {
    let whole = value / div;
    let rem = value % div;
    if rem == 0 {
        return whole.to_string();
    }
    let width = div.ilog10() as usize;
    let frac = format!("{rem:0width$}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

const SIZE_PREFIXES: &[(&str, u128)] = &[
    ("", 1),
    ("K", 1_000),
    ("Ki", 1 << 10),
    ("M", 1_000_000),
    ("Mi", 1 << 20),
    ("G", 1_000_000_000),
    ("Gi", 1 << 30),
    ("T", 1_000_000_000_000),
    ("Ti", 1 << 40),
    ("P", 1_000_000_000_000_000),
    ("Pi", 1 << 50),
    ("E", 1_000_000_000_000_000_000),
    ("Ei", 1 << 60),
];

/// Parse an Arvados byte size string: a decimal number, optional spaces, then an optional
/// SI (`K`, `M`, …, powers of 1000) or IEC (`Ki`, `Mi`, …, powers of 1024) prefix with an
/// optional `B`. The result must be a whole number of bytes that fits in an `i64`.
///
/// Better than Go: Arvados' own parser silently returns 0 for a suffix-less string such as
/// `"1000"` and rejects fractions such as `"1.5GiB"`; both work here.
///
/// ```
/// use arvados::config::units::parse_byte_size;
///
/// assert_eq!(parse_byte_size("550MiB"), Ok(550 << 20));
/// assert_eq!(parse_byte_size("1.5GiB"), Ok(3 << 29));
/// assert_eq!(parse_byte_size("1000"), Ok(1000));
/// ```
pub fn parse_byte_size(s: &str) -> Result<i64, String> {
    let invalid = || format!("invalid byte size {s:?}");
    let t = s.trim();
    let num_len = t
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (num, unit) = t.split_at(num_len);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return Err(invalid());
    }
    let unit = unit.trim_start();
    let prefix = unit.strip_suffix('B').unwrap_or(unit);
    let Some(&(_, mult)) = SIZE_PREFIXES.iter().find(|(p, _)| *p == prefix) else {
        return Err(format!("invalid byte size {s:?}: unknown unit {unit:?}"));
    };
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    let int_val: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| invalid())?
    };
    let mut total = int_val.checked_mul(mult).ok_or_else(invalid)?;
    if !frac_part.is_empty() {
        let frac_digits = frac_part.trim_end_matches('0');
        if frac_digits.len() > 30 {
            return Err(invalid());
        }
        let frac_val: u128 = if frac_digits.is_empty() {
            0
        } else {
            frac_digits.parse().map_err(|_| invalid())?
        };
        let denom = 10u128.pow(frac_digits.len() as u32);
        let scaled = frac_val.checked_mul(mult).ok_or_else(invalid)?;
        if scaled % denom != 0 {
            return Err(format!(
                "invalid byte size {s:?}: not a whole number of bytes"
            ));
        }
        total = total.checked_add(scaled / denom).ok_or_else(invalid)?;
    }
    i64::try_from(total).map_err(|_| format!("invalid byte size {s:?}: too large"))
}

/// Serde adaptor for `std::time::Duration` fields written as Go duration strings.
pub mod duration {
    use super::*;
    use serde::{Deserializer, Serializer, de};

    /// Write a duration as a Go duration string (`1m30s`).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    /// Read a Go duration string (`1m30s`, `250ms`); a bare 0 is accepted too.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string like \"10s\" or \"1h30m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                // Go accepts a bare "0"; a YAML 0 is the same intent.
                if v == 0 {
                    Ok(Duration::ZERO)
                } else {
                    Err(E::custom(format!(
                        "invalid duration {v}: give a unit, e.g. \"{v}s\""
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                if v >= 0 {
                    self.visit_u64(v as u64)
                } else {
                    Err(E::custom(format!(
                        "invalid duration {v}: must not be negative"
                    )))
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: give a unit, e.g. \"{v}s\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// Serde adaptor for byte sizes (`i64` bytes) written as integers or size strings.
pub mod byte_size {
    use super::*;
    use serde::{Deserializer, Serializer, de};

    /// Write a size as an integer number of bytes.
    pub fn serialize<S: Serializer>(n: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(*n)
    }

    /// Read a size: an integer, or a string like `550MiB` or `1G`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = i64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte size like 1073741824, \"550MiB\" or \"16GB\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
                parse_byte_size(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
                i64::try_from(v).map_err(|_| E::custom(format!("invalid byte size {v}: too large")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
                if v < 0 {
                    Err(E::custom(format!(
                        "invalid byte size {v}: must not be negative"
                    )))
                } else {
                    Ok(v)
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
                if v >= 0.0 && v.fract() == 0.0 && v < 9.2e18 {
                    Ok(v as i64)
                } else {
                    Err(E::custom(format!(
                        "invalid byte size {v}: not a whole number of bytes"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        let cases = [
            ("10s", Duration::from_secs(10)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3.5s", Duration::from_millis(3_723_500)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            ("-0s", Duration::ZERO),
            ("300ms", Duration::from_millis(300)),
            ("1.5h", Duration::from_secs(5400)),
            ("2us", Duration::from_micros(2)),
            ("2µs", Duration::from_micros(2)),
            ("7ns", Duration::from_nanos(7)),
            (".5s", Duration::from_millis(500)),
            ("24h", Duration::from_secs(86400)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_durations_name_the_value() {
        for s in ["1x", "", "s", "10", "1m5", "abc", "1.s.", "--1s"] {
            let err = parse_duration(s).unwrap_err();
            assert!(err.contains(&format!("{s:?}")), "{s}: {err}");
        }
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
    }

    #[test]
    fn durations_format_like_go() {
        let cases = [
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(300), "300ms"),
            (Duration::ZERO, "0s"),
            (Duration::from_secs(86400), "24h0m0s"),
            (Duration::from_micros(1500), "1.5ms"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want), Ok(d), "round trip {want}");
        }
    }

    #[test]
    fn byte_sizes_parse() {
        let cases = [
            ("550MiB", 550 << 20),
            ("16GB", 16_000_000_000),
            ("16G", 16_000_000_000),
            ("1.5GiB", 3 << 29),
            ("1000", 1000),
            ("0", 0),
            ("128MiB", 128 << 20),
            ("32 MiB", 32 << 20),
            ("8KiB", 8192),
            ("2TB", 2_000_000_000_000),
            ("1Ei", 1 << 60),
            ("0.5KB", 500),
        ];
        for (s, want) in cases {
            assert_eq!(parse_byte_size(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_byte_sizes_are_rejected() {
        for s in ["", "MiB", "1.2.3GB", "12XB", "1.1B", "16EiB", "-5", "1 2"] {
            assert!(parse_byte_size(s).is_err(), "{s} should fail");
        }
    }
}
