//! Wall-clock helpers. Timestamps are stored as epoch milliseconds (for conditions and the
//! sweeper index) and RFC 3339 strings (for people). Formatting uses the SDK's own date type,
//! which every binary links anyway.

use aws_smithy_types::date_time::{DateTime, Format};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// RFC 3339 (UTC) of an epoch-millisecond instant, e.g. `2026-11-24T05:28:31.964Z`.
pub fn rfc3339(ms: i64) -> String {
    DateTime::from_millis(ms)
        .fmt(Format::DateTime)
        .unwrap_or_default()
}

/// The invocation's deadline (epoch ms) from Lambda's context (`ctx_deadline_ms`, 0 when
/// there is none, as in a hand-made event), or `fallback_ms` from now.
pub fn deadline_ms(ctx_deadline_ms: u64, fallback_ms: i64) -> i64 {
    if ctx_deadline_ms > 0 {
        ctx_deadline_ms as i64
    } else {
        now_ms() + fallback_ms
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn when_formatting_should_give_rfc3339_utc_with_milliseconds() {
        assert_eq!(
            super::rfc3339(1_764_000_000_123),
            "2025-11-24T16:00:00.123Z"
        );
        assert!(super::now_ms() > 1_700_000_000_000);
    }
}
