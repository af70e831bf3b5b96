//! Wall-clock helpers. Timestamps are stored as epoch milliseconds (for conditions and the
//! sweeper index) and RFC 3339 strings (for people).

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 (UTC, millisecond precision) of an epoch-millisecond instant.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
