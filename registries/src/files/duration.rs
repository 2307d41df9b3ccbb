//! Durations as operators write them in registry files: a decimal number and a unit
//! (`250ms`, `3s`, `1.5s`, `1m`, `1h`).
//!
//! Hand-written rather than a dependency because the grammar is four units wide, and parsed
//! with integer arithmetic so that `0.1s` is exactly 100 ms (no float rounding into config
//! hashes).

use std::time::Duration;

const UNITS: [(&str, u128); 4] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
];

/// Parses `text` into a duration; the error is a sentence fragment without the field name,
/// which the caller prefixes.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let expected =
        "expected a number and a unit, like \"250ms\", \"3s\", \"1.5s\", \"1m\" or \"1h\"";
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_len);
    let Some(&(_, unit_nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(format!("\"{text}\" is not a duration ({expected})"));
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    let digits_ok = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole) || !digits_ok(fraction) || number.ends_with('.') {
        return Err(format!("\"{text}\" is not a duration ({expected})"));
    }
    let too_long = || format!("\"{text}\" is too long a duration");
    let whole: u128 = whole.parse().map_err(|_| too_long())?;
    let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(too_long)?;
    // Each fraction digit is worth a tenth of the previous one; digits finer than a
    // nanosecond are dropped.
    let mut place = unit_nanos;
    for digit in fraction.bytes() {
        place /= 10;
        nanos += u128::from(digit - b'0') * place;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long())?;
    // The remainder is below 10^9 and so fits in u32.
    let subsec = (nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, subsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn parses_fractions_exactly() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.25m"), Ok(Duration::from_secs(75)));
        assert_eq!(parse_duration("0.5ms"), Ok(Duration::from_micros(500)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "", "3", "s", "3 s", "-1s", "1.s", ".5s", "1..5s", "3sec", "3S", "1d", "1e3s", "1.5.5s",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("is not a duration"), "{bad}: {err}");
        }
        assert!(parse_duration("99999999999999999999999h")
            .expect_err("overflow")
            .contains("too long"));
    }
}
