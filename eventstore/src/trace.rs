//! Trace context carried by events: the W3C `traceparent` of the span that appended an event,
//! kept in its metadata so that whatever handles the event later (a projection's span) can link
//! back to where it came from, across processes.
//!
//! Without the `opentelemetry` feature the store keeps a `traceparent` the caller sets
//! ([`Metadata::with_traceparent`](crate::Metadata::with_traceparent)) and derives none. With it,
//! an event appended without one gets the context of the store's `annal.append` span (a child
//! of the caller's span) when an OpenTelemetry layer records that span.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A W3C trace context `traceparent` (version `00`): a trace id, the id of the span within it
/// and the trace flags, written `00-<32 hex digits>-<16 hex digits>-<2 hex digits>`, lower case,
/// neither id all zeros.
///
/// It is a reserved metadata key: set it with
/// [`Metadata::with_traceparent`](crate::Metadata::with_traceparent). A `TraceParent` is valid
/// by construction, so every stored one reads back.
///
/// ```
/// use annal_eventstore::TraceParent;
///
/// let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap();
/// assert_eq!(parent.trace_id(), 0x4bf92f3577b34da6a3ce929d0e0e4736);
/// assert!(parent.is_sampled());
/// assert_eq!(parent.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert!("00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse::<TraceParent>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceParent {
    /// The trace context of span `span_id` in trace `trace_id`, with `flags` (bit 0: sampled);
    /// `None` if either id is zero (W3C: such a context is invalid).
    pub fn new(trace_id: u128, span_id: u64, flags: u8) -> Option<Self> {
        (trace_id != 0 && span_id != 0).then_some(TraceParent { trace_id, span_id, flags })
    }

    /// The trace id.
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The id of the span (the W3C "parent id").
    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    /// The trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the span was sampled (flag bit 0).
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The context of the current `tracing` span, as the OpenTelemetry layer records it; `None`
    /// when no layer records the span (or no span is entered).
    #[cfg(feature = "opentelemetry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
    pub fn current() -> Option<Self> {
        TraceParent::of(&tracing::Span::current())
    }

    /// The context of `span`, as the OpenTelemetry layer records it; `None` when no layer
    /// records the span (it is disabled, or no `tracing-opentelemetry` layer is installed).
    #[cfg(feature = "opentelemetry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
    pub fn of(span: &tracing::Span) -> Option<Self> {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let context = span.context();
        let span = context.span();
        let span = span.span_context();
        if !span.is_valid() {
            return None;
        }
        TraceParent::new(
            u128::from_be_bytes(span.trace_id().to_bytes()),
            u64::from_be_bytes(span.span_id().to_bytes()),
            span.trace_flags().to_u8(),
        )
    }

    /// This context as a remote OpenTelemetry span context, to link a span to (with
    /// `tracing_opentelemetry::OpenTelemetrySpanExt::add_link`) or to parent one on.
    #[cfg(feature = "opentelemetry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
    pub fn span_context(&self) -> opentelemetry::trace::SpanContext {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        )
    }
}

/// The trace context of the current span, for an append of events that carry none.
#[cfg(feature = "opentelemetry")]
pub(crate) fn ambient() -> Option<TraceParent> {
    TraceParent::current()
}

/// Without the `opentelemetry` feature no span has a trace context to derive.
#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn ambient() -> Option<TraceParent> {
    None
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

/// The error of parsing a [`TraceParent`]: the text is not `00-<32 hex>-<16 hex>-<2 hex>` in
/// lower case, or an id is all zeros.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid traceparent {0:?}: expected 00-<32 hex digits>-<16 hex digits>-<2 hex digits>, lower case, ids not all zeros"
)]
pub struct ParseTraceParentError(String);

impl FromStr for TraceParent {
    type Err = ParseTraceParentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseTraceParentError(crate::error::truncated(s));
        let hex = |part: &str, len: usize| {
            let lower_hex = part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if part.len() == len && lower_hex { Ok(()) } else { Err(err()) }
        };
        let mut parts = s.split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err());
        };
        if version != "00" {
            return Err(err());
        }
        hex(trace, 32)?;
        hex(span, 16)?;
        hex(flags, 2)?;
        let trace = u128::from_str_radix(trace, 16).map_err(|_| err())?;
        let span = u64::from_str_radix(span, 16).map_err(|_| err())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| err())?;
        TraceParent::new(trace, span, flags).ok_or_else(err)
    }
}

impl Serialize for TraceParent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceParent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_invalid_text_is_refused() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let parsed: TraceParent = good.parse().unwrap();
        assert_eq!((parsed.span_id(), parsed.flags(), parsed.is_sampled()), (0x00f067aa0ba902b7, 0, false));
        assert_eq!(parsed.to_string(), good);
        for bad in [
            "",
            "00",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-+0f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-g1",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad:?} was accepted");
            assert!(serde_json::from_value::<TraceParent>(bad.into()).is_err(), "{bad:?} was decoded");
        }
        assert_eq!(serde_json::to_value(parsed).unwrap(), good);
        assert_eq!(serde_json::from_value::<TraceParent>(good.into()).unwrap(), parsed);
        assert_eq!(TraceParent::new(0, 1, 1), None);
        assert_eq!(TraceParent::new(1, 0, 1), None);
    }
}
