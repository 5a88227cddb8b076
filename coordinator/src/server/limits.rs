//! Quotas and checks on what workers send: per-session rate limits, printable bounded strings,
//! ring addresses.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use proto::convert::WireError;

/// A token bucket: `rate` per second, at most `burst` at once.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst, level: burst, at: Instant::now() }
    }

    /// Takes one token; false when the bucket is empty.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.level = (self.level + dt * self.rate).min(self.burst);
        if self.level >= 1.0 {
            self.level -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A session's quotas. The figures leave an honest worker far inside them (a heartbeat a
/// second, metrics every few seconds, a commitment and a report per sync; bursts when it
/// replays what it could not send during a disconnect) and bound what a hostile one can make
/// the coordinator do or store.
#[derive(Debug, Clone)]
pub(crate) struct SessionLimits {
    pub(crate) all: Bucket,
    pub(crate) metrics: Bucket,
    pub(crate) checkpoints: Bucket,
    pub(crate) faults: Bucket,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            all: Bucket::new(200.0, 2_000.0),
            metrics: Bucket::new(2.0, 64.0),
            checkpoints: Bucket::new(1.0, 16.0),
            faults: Bucket::new(1.0, 16.0),
        }
    }
}

/// `s` if it is at most `max` bytes of printable ASCII (no control characters, no escapes for
/// an admin's terminal).
pub(crate) fn printable(field: &'static str, s: &str, max: usize) -> Result<(), WireError> {
    if s.len() > max {
        return Err(WireError::new(field, format!("longer than {max} bytes")));
    }
    if let Some(c) = s.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(WireError::new(
            field,
            format!("contains the character {c:?}; printable ASCII only"),
        ));
    }
    Ok(())
}

/// A SHA-256 in hex (64 digits, either case) or nothing; returned in lower case.
pub(crate) fn digest(field: &'static str, s: &str) -> Result<String, WireError> {
    if s.is_empty() || (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(WireError::new(field, "expected 64 hex digits or nothing"))
    }
}

/// At most `max` characters of `s`, with anything not printable ASCII replaced by `?` (for
/// free text that is only logged).
pub(crate) fn sanitize(s: &str, max: usize) -> String {
    s.chars().take(max).map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect()
}

/// A ring address a worker advertises: a real unicast address and port; loopback only from a
/// worker that itself connects over loopback (a worker on the coordinator's machine).
pub(crate) fn ring_addr(
    field: &'static str,
    v: &str,
    from: Option<IpAddr>,
) -> Result<SocketAddr, WireError> {
    let addr = proto::convert::socket_addr(field, v)?;
    let ip = addr.ip();
    let bad = |why: &str| Err(WireError::new(field, format!("{addr}: {why}")));
    if addr.port() == 0 {
        return bad("port 0");
    }
    if ip.is_unspecified() {
        return bad("an unspecified address is not one peers can reach");
    }
    if ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return bad("not a unicast address");
    }
    if ip.is_loopback() && !from.is_some_and(|f| f.is_loopback()) {
        return bad("loopback is accepted only from a worker on the coordinator's machine");
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_refill_at_their_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2.0, 3.0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!(!b.take(t0 + Duration::from_millis(500)));
        // Long idle: back to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
    }

    #[test]
    fn strings_and_addresses_are_checked() {
        assert!(printable("uri", "file:///a/b", 100).is_ok());
        assert!(
            printable("uri", "\u{1b}]0;pwned\u{7}", 100).unwrap_err().to_string().contains("uri")
        );
        assert!(printable("uri", &"a".repeat(101), 100).is_err());
        assert_eq!(sanitize("a\u{1b}b", 10), "a?b");
        let lo = Some(IpAddr::from([127, 0, 0, 1]));
        let far = Some(IpAddr::from([203, 0, 113, 9]));
        assert!(ring_addr("ring_addr", "127.0.0.1:7071", lo).is_ok());
        assert!(ring_addr("ring_addr", "127.0.0.1:7071", far).is_err());
        assert!(ring_addr("ring_addr", "0.0.0.0:7071", far).is_err());
        assert!(ring_addr("ring_addr", "198.51.100.1:0", far).is_err());
        assert!(ring_addr("ring_addr", "224.0.0.1:7071", far).is_err());
        assert!(ring_addr("ring_addr", "198.51.100.1:7071", far).is_ok());
    }
}
