//! W3C trace context: the `traceparent` of the current span (feature `opentelemetry`), and parsing
//! one back into a parent context on the consumer side.

/// The current span's W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), if it belongs to an
/// OpenTelemetry trace.
#[cfg(feature = "opentelemetry")]
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// Without the `opentelemetry` feature there is no trace to carry.
#[cfg(not(feature = "opentelemetry"))]
pub fn current_traceparent() -> Option<String> {
    None
}

/// A remote parent context from a `traceparent` header value; `None` if it is malformed.
#[cfg(feature = "opentelemetry")]
pub fn parent_context(traceparent: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid()
        .then(|| opentelemetry::Context::new().with_remote_span_context(sc))
}

#[cfg(all(test, feature = "opentelemetry"))]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn traceparent_round_trip() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parent_context(tp).expect("valid");
        let span = cx.span();
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(parent_context("01-xx").is_none());
        assert!(parent_context("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    }
}
