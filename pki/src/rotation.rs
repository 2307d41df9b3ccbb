//! When to renew a certificate: a pure schedule, no timers.
//!
//! Renewal starts at 50% of the certificate's lifetime, moved by up to ±`jitter_fraction` of
//! the lifetime so that hosts started together do not all call the CA at once (Istio #52102).
//! With the default jitter of 0.1 that is between 40% and 60%, about 10h to 14h into a 24h
//! certificate, which leaves at least 10h of CA outage before a certificate lapses. Whatever
//! the jitter, renewal is never before `not_before` and never later than 80% of the lifetime.
//! On failure the caller retries with backoff; the schedule does not move.

use std::time::{Duration, SystemTime};

use rand::RngExt;

/// The default jitter: ±10% of the lifetime around the midpoint.
pub const DEFAULT_JITTER_FRACTION: f64 = 0.1;
/// The latest point of the lifetime at which renewal may be scheduled.
pub const LATEST_FRACTION: f64 = 0.8;

/// When to start renewing a certificate valid from `not_before` to `not_after`.
/// `jitter_fraction` is clamped to `0.0..=0.5`. A certificate with no lifetime (not_after at
/// or before not_before) is due at `not_before`, that is, now.
pub fn renew_at<R: RngExt + ?Sized>(
    not_before: SystemTime,
    not_after: SystemTime,
    jitter_fraction: f64,
    rng: &mut R,
) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_before;
    };
    let jitter = if jitter_fraction.is_finite() {
        jitter_fraction.clamp(0.0, 0.5)
    } else {
        0.0
    };
    let offset = if jitter > 0.0 {
        rng.random_range(-jitter..=jitter)
    } else {
        0.0
    };
    let fraction = (0.5 + offset).clamp(0.0, LATEST_FRACTION);
    not_before + lifetime.mul_f64(fraction)
}

/// How long from `now` until renewal is due (zero if it already is).
pub fn renew_in<R: RngExt + ?Sized>(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    jitter_fraction: f64,
    rng: &mut R,
) -> Duration {
    renew_at(not_before, not_after, jitter_fraction, rng)
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn no_jitter_is_half_the_lifetime() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(renew_at(t0(), t0() + DAY, 0.0, &mut rng), t0() + DAY / 2);
    }

    #[test]
    fn default_jitter_stays_between_40_and_60_percent_and_spreads() {
        let mut rng = StdRng::seed_from_u64(7);
        let (lo, hi) = (t0() + DAY.mul_f64(0.4), t0() + DAY.mul_f64(0.6));
        let mut seen = Vec::new();
        for _ in 0..1000 {
            let at = renew_at(t0(), t0() + DAY, DEFAULT_JITTER_FRACTION, &mut rng);
            assert!(at >= lo && at <= hi, "{at:?}");
            seen.push(at);
        }
        let min = seen.iter().min().unwrap();
        let max = seen.iter().max().unwrap();
        // The spread covers most of the ±2.4h window, so hosts do not renew together.
        assert!(max.duration_since(*min).unwrap() > Duration::from_secs(4 * 3600));
    }

    #[test]
    fn never_later_than_80_percent_nor_before_not_before() {
        let mut rng = StdRng::seed_from_u64(3);
        for jitter in [0.3, 0.5, 5.0, f64::INFINITY, f64::NAN, -1.0] {
            for _ in 0..200 {
                let at = renew_at(t0(), t0() + DAY, jitter, &mut rng);
                assert!(at <= t0() + DAY.mul_f64(0.8), "jitter {jitter}: {at:?}");
                assert!(at >= t0(), "jitter {jitter}");
            }
        }
    }

    #[test]
    fn expired_or_empty_lifetime_is_due_now() {
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(renew_at(t0(), t0(), 0.1, &mut rng), t0());
        assert_eq!(renew_at(t0() + DAY, t0(), 0.1, &mut rng), t0() + DAY);
        assert_eq!(
            renew_in(t0() + DAY, t0(), t0() + DAY, 0.1, &mut rng),
            Duration::ZERO
        );
        assert_eq!(renew_in(t0(), t0(), t0() + DAY, 0.0, &mut rng), DAY / 2);
    }
}
