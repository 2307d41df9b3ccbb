//! The one duration grammar of every Pilotfish file (discovery.toml, agent.toml, registry
//! files, `[registry.consul]`) and of duration flags: a decimal number and a unit, `ms`, `s`,
//! `m`, `h` or `d` (`250ms`, `1.5s`, `2m`, `1.5h`, `7d`).
//!
//! Hand-written rather than a dependency because the grammar is five units wide, and parsed
//! with checked integer arithmetic so that `0.1s` is exactly 100 ms (no float rounding into
//! config hashes) and a huge number is an error, never an overflow.

use std::time::Duration;

const UNITS: [(&str, u128); 5] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
    ("d", 86_400 * 1_000_000_000),
];

/// What the grammar looks like, for messages.
pub const DURATION_EXAMPLES: &str = "\"250ms\", \"1.5s\", \"2m\", \"1.5h\" or \"7d\"";

/// Parses `text` into a duration; the error is a sentence fragment without the key, which
/// the caller puts in front (a [`super::Problem`]'s key path).
///
/// No sign, no exponent, no spaces, no leading or trailing `.`, units in lower case. Digits
/// finer than a nanosecond are dropped.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let not_a_duration = || {
        format!(
            "\"{text}\" is not a duration (expected a number and a unit, like {DURATION_EXAMPLES})"
        )
    };
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_len);
    let Some(&(_, unit_nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(not_a_duration());
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    let digits_ok = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole) || !digits_ok(fraction) || number.ends_with('.') {
        return Err(not_a_duration());
    }
    let too_long = || format!("\"{text}\" is too long a duration");
    let whole: u128 = whole.parse().map_err(|_| too_long())?;
    let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(too_long)?;
    // Each fraction digit is worth a tenth of the previous one.
    let mut place = unit_nanos;
    for digit in fraction.bytes() {
        place /= 10;
        nanos = nanos
            .checked_add(u128::from(digit - b'0') * place)
            .ok_or_else(too_long)?;
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
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn parses_fractions_exactly() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.25m"), Ok(Duration::from_secs(75)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0.5d"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("0.5ms"), Ok(Duration::from_micros(500)));
        assert_eq!(
            parse_duration("1.0000000001s"),
            Ok(Duration::from_secs(1)),
            "finer than a nanosecond is dropped"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "", "3", "s", "3 s", " 3s", "3s ", "-1s", "+1s", "1.s", ".5s", "1..5s", "3sec", "3S",
            "1w", "1e3s", "1.5.5s", "1d2h",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("is not a duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn huge_values_are_errors_not_overflows() {
        for huge in [
            "99999999999999999999999h",
            "99999999999999999999999999999999999999999d",
            "18446744073709551616s",
            "213503982334602d",
            "340282366920938463463374607431768211455ms",
        ] {
            let err = parse_duration(huge).expect_err(huge);
            assert!(err.contains("too long"), "{huge}: {err}");
        }
        // The largest whole-second value still fits.
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
    }
}
