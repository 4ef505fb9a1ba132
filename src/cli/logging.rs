//! The server's log output: text for people or one JSON object per line for collectors, every
//! line stamped with the node's id (`server.node_id`) so logs of several nodes can be merged.
//!
//! Owns the format only; what is logged, and that no secret ever is, is each layer's business.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Format, Full, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Wraps a formatter and puts the node id first on every line.
struct WithNode<F> {
    node: String,
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithNode<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if !self.json {
            write!(writer, "node={} ", self.node)?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The node id is restricted to [A-Za-z0-9._-] (config), so it needs no JSON escaping.
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"node\":\"{}\",{rest}", self.node),
            None => writer.write_str(&line),
        }
    }
}

/// Installs the global subscriber (`RUST_LOG` filters, default `info`), writing to stderr.
pub fn init(format: LogFormat, node: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .event_format(WithNode::<Format<Full>> {
                node: node.to_owned(),
                inner: Format::default(),
                json: false,
            })
            .fmt_fields(DefaultFields::new())
            .try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .event_format(WithNode::<Format<Json>> {
                node: node.to_owned(),
                inner: Format::default().json(),
                json: true,
            })
            .fmt_fields(JsonFields::new())
            .try_init(),
    };
}
