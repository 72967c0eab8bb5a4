//! The seeder's upload rate limit (`upload_limit_mb_per_sec`): every piece
//! waits in line for its bytes' worth of budget before it is read and sent,
//! whoever asked for it, so a worker seeding over a home uplink leaves room
//! for everything else. A piece that would wait longer than [`BUSY_AFTER`]
//! is refused at once as busy (the leecher asks again a moment later or asks
//! another seeder) rather than left to time out. Pacing is the GCRA of the
//! `governor` crate, counted in KiB.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Bytes per unit of budget.
const CELL: u64 = 1024;
/// Longest wait in line before a piece is refused as busy (well inside the
/// leecher's piece timeout).
pub const BUSY_AFTER: Duration = Duration::from_secs(10);

pub struct UploadLimit {
    limiter: DefaultDirectRateLimiter,
    /// Largest number of cells one wait may ask for (the burst).
    burst: u32,
    mb_per_sec: f64,
    /// Pieces wait their turn in order (tokio's mutex is fair).
    line: tokio::sync::Mutex<()>,
    /// Bytes waiting in line or being paced.
    queued: AtomicU64,
}

/// Takes a piece's bytes out of the line however its wait ends.
struct InLine<'a>(&'a AtomicU64, u64);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl UploadLimit {
    /// A limit of `mb_per_sec` megabytes (10^6 bytes) per second; `None`
    /// for 0 (unlimited) or a value that is not a positive number.
    pub fn new(mb_per_sec: f64) -> Option<UploadLimit> {
        if !mb_per_sec.is_finite() || mb_per_sec <= 0.0 {
            return None;
        }
        let per_sec = (mb_per_sec * 1e6 / CELL as f64)
            .round()
            .clamp(1.0, u32::MAX as f64) as u32;
        // Up to 10 ms worth goes out at once (at least 64 KiB), so even a
        // short transfer keeps to the rate.
        let burst = (per_sec / 100).max(64);
        let quota =
            Quota::per_second(NonZeroU32::new(per_sec)?).allow_burst(NonZeroU32::new(burst)?);
        Some(UploadLimit {
            limiter: RateLimiter::direct(quota),
            burst,
            mb_per_sec,
            line: tokio::sync::Mutex::new(()),
            queued: AtomicU64::new(0),
        })
    }

    /// Waits in line until `bytes` may be sent; `Err(wait)` without waiting
    /// when the line ahead would take longer than [`BUSY_AFTER`].
    pub async fn take_in_line(&self, bytes: usize) -> Result<(), Duration> {
        let bytes = bytes as u64;
        let ahead = self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let guard = InLine(&self.queued, bytes);
        let wait = Duration::from_secs_f64(ahead as f64 / (self.mb_per_sec * 1e6));
        if wait > BUSY_AFTER {
            return Err(wait);
        }
        let _turn = self.line.lock().await;
        self.take(bytes as usize).await;
        drop(guard);
        Ok(())
    }

    pub fn mb_per_sec(&self) -> f64 {
        self.mb_per_sec
    }

    /// Waits until `bytes` may be sent (not in line).
    async fn take(&self, bytes: usize) {
        let mut cells = (bytes as u64).div_ceil(CELL);
        while cells > 0 {
            let n = cells.min(self.burst as u64) as u32;
            if let Some(n) = NonZeroU32::new(n) {
                // `n` never exceeds the burst, so this cannot fail.
                let _ = self.limiter.until_n_ready(n).await;
            }
            cells -= n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn zero_or_nonsense_is_unlimited() {
        assert!(UploadLimit::new(0.0).is_none());
        assert!(UploadLimit::new(-3.0).is_none());
        assert!(UploadLimit::new(f64::NAN).is_none());
        assert!(UploadLimit::new(1.0).is_some());
    }

    #[tokio::test]
    async fn paces_bytes_to_the_rate() {
        // 10 MB/s: after the burst (10 ms worth), 5 MB more need at least
        // 0.49 s (a lower bound: a limiter cannot be faster).
        let l = UploadLimit::new(10.0).unwrap();
        l.take(1_000_000).await;
        let t = Instant::now();
        for _ in 0..5 {
            l.take(1_000_000).await;
        }
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(490), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn a_line_longer_than_the_busy_bound_is_refused_at_once() {
        // 1 MB/s: 8 MB in line is 8 s of budget, 4 MB more would be 12 s.
        let l = std::sync::Arc::new(UploadLimit::new(1.0).unwrap());
        let waiting: Vec<_> = (0..8)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { l.take_in_line(1_000_000).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = std::time::Instant::now();
        let wait = l.take_in_line(4_000_000).await.unwrap_err();
        assert!(wait > BUSY_AFTER, "{wait:?}");
        assert!(t.elapsed() < Duration::from_millis(100));
        for w in waiting {
            w.abort();
        }
    }
}
