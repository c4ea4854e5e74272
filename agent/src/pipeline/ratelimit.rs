//! Warnings that fire at most once per interval and report what they held back.

use std::time::{Duration, Instant};

/// Lets a log line through at most once per interval.
#[derive(Debug)]
pub struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// A limiter passing one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        RateLimitedLog {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; `Some(n)` carries how many lines were held back since the last one.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`allow`](Self::allow) with an explicit clock reading, for tests.
    pub fn allow_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_suppressed_count() {
        let t0 = Instant::now();
        let mut l = RateLimitedLog::new(Duration::from_secs(60));
        assert_eq!(l.allow_at(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.allow_at(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(l.allow_at(t0 + Duration::from_secs(59)), None);
        assert_eq!(l.allow_at(t0 + Duration::from_secs(60)), Some(6));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(61)), None);
        assert_eq!(l.allow_at(t0 + Duration::from_secs(200)), Some(1));
    }
}
