//! How often the watcher may ask: a token bucket for the happy path (Consul's advice: rate-limit
//! the loop instead of sleeping) and a jittered exponential backoff after errors.

use std::time::Duration;

use tokio::time::Instant;

/// Burst `capacity`, then one request per `every`.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    every: Duration,
    last: Instant,
}

impl TokenBucket {
    pub fn new(capacity: u32, every: Duration) -> TokenBucket {
        TokenBucket {
            capacity: f64::from(capacity.max(1)),
            tokens: f64::from(capacity.max(1)),
            every: every.max(Duration::from_millis(1)),
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.last).as_secs_f64() / self.every.as_secs_f64();
        self.tokens = (self.tokens + earned).min(self.capacity);
        self.last = now;
    }

    /// Takes a token if one is there; otherwise says how long until one is.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.every.mul_f64(1.0 - self.tokens))
        }
    }

    /// Waits for a token (no wait in the happy path).
    pub async fn acquire(&mut self) {
        while let Err(wait) = self.try_take(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Exponential backoff from `min` to `max`, each delay drawn uniformly from its upper half so
/// that many watchers do not retry in step.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Jumps to the cap: for errors retrying soon will not fix (an unknown datacenter).
    pub fn saturate(&mut self) {
        self.next = self.max;
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        let jitter = rand::random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn consul_token_bucket_bursts_then_paces() {
        let mut b = TokenBucket::new(2, Duration::from_secs(15));
        let start = Instant::now();
        b.acquire().await;
        b.acquire().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        b.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(15));
        // 60 s of constant demand: at most burst + 60/15 requests.
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < Duration::from_secs(60) {
            b.acquire().await;
            n += 1;
        }
        assert!(n <= 2 + 4 + 1, "{n}");
    }

    #[test]
    fn consul_backoff_grows_with_jitter_to_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[7] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
