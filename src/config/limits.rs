//! The `limits` table of a listener's section (`[server.limits]`, `[xks.limits]`): the bounds a
//! client can hold of it ([`ListenerLimits`]). Every key is optional; the defaults are safe.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::listener::{AnonymousLimits, ListenerLimits};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsSection {
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    max_handshakes: Option<usize>,
    handshake_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    header_timeout_secs: Option<u64>,
    max_streams_per_connection: Option<u32>,
    handshakes_per_source_per_sec: Option<u32>,
    anonymous_connections_per_source: Option<usize>,
    anonymous_read_bytes_per_sec: Option<u32>,
}

/// The section's limits over `defaults`; `section` names it in errors (`server.limits`).
pub(super) fn parse_limits(
    raw: Option<LimitsSection>,
    defaults: ListenerLimits,
    section: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ListenerLimits, ConfigError> {
    let raw = raw.unwrap_or_default();
    let count = |key: &str, value: Option<usize>, default: usize, max: usize| {
        let v = value.unwrap_or(default);
        if (1..=max).contains(&v) {
            Ok(v)
        } else {
            Err(err(
                &format!("{section}.{key}"),
                format!("must be 1 to {max}"),
            ))
        }
    };
    let secs = |key: &str, value: Option<u64>, default: Duration| match value {
        None => Ok(default),
        Some(v) if (1..=86_400).contains(&v) => Ok(Duration::from_secs(v)),
        Some(_) => Err(err(
            &format!("{section}.{key}"),
            "must be 1 to 86400".into(),
        )),
    };
    let max_connections = count(
        "max_connections",
        raw.max_connections,
        defaults.max_connections,
        1_000_000,
    )?;
    let per_source = count(
        "max_connections_per_source",
        raw.max_connections_per_source,
        defaults.max_connections_per_source.min(max_connections),
        max_connections,
    )?;
    let ranged =
        |key: &str, value: Option<u32>, default: u32, range: std::ops::RangeInclusive<u32>| {
            let v = value.unwrap_or(default);
            if range.contains(&v) {
                Ok(v)
            } else {
                Err(err(
                    &format!("{section}.{key}"),
                    format!("must be {} to {}", range.start(), range.end()),
                ))
            }
        };
    let streams = ranged(
        "max_streams_per_connection",
        raw.max_streams_per_connection,
        defaults.max_streams_per_connection,
        1..=10_000,
    )?;
    let anonymous = match defaults.anonymous {
        None => {
            if raw.anonymous_connections_per_source.is_some()
                || raw.anonymous_read_bytes_per_sec.is_some()
            {
                return Err(err(
                    &format!("{section}.anonymous_connections_per_source"),
                    "this listener does not authenticate by certificate; the anonymous limits are for [server.limits]".into(),
                ));
            }
            None
        }
        Some(d) => {
            let rate = ranged(
                "anonymous_read_bytes_per_sec",
                raw.anonymous_read_bytes_per_sec,
                d.read_bytes_per_sec,
                256..=100_000_000,
            )?;
            Some(AnonymousLimits {
                per_source: count(
                    "anonymous_connections_per_source",
                    raw.anonymous_connections_per_source,
                    d.per_source.min(per_source),
                    per_source,
                )?,
                read_bytes_per_sec: rate,
            })
        }
    };
    Ok(ListenerLimits {
        max_connections,
        max_connections_per_source: per_source,
        max_handshakes: count(
            "max_handshakes",
            raw.max_handshakes,
            defaults.max_handshakes,
            100_000,
        )?,
        handshake_timeout: secs(
            "handshake_timeout_secs",
            raw.handshake_timeout_secs,
            defaults.handshake_timeout,
        )?,
        idle_timeout: secs(
            "idle_timeout_secs",
            raw.idle_timeout_secs,
            defaults.idle_timeout,
        )?,
        header_timeout: secs(
            "header_timeout_secs",
            raw.header_timeout_secs,
            defaults.header_timeout,
        )?,
        request_timeout: defaults.request_timeout,
        max_streams_per_connection: streams,
        handshakes_per_source_per_sec: ranged(
            "handshakes_per_source_per_sec",
            raw.handshakes_per_source_per_sec,
            defaults.handshakes_per_source_per_sec,
            1..=1_000_000,
        )?,
        anonymous,
    })
}
