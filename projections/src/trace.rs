//! The span a worker applies a batch in: the projection, the partition and the range, the
//! correlation and causation ids its events share, and (with the `opentelemetry` feature) a
//! link to the span that appended each event, from the `traceparent` its metadata keeps.

use annal_eventstore::{Position, RecordedEvent};
use uuid::Uuid;

/// The `batch` span for `events`, read from `from` up to `to`.
pub(crate) fn batch_span(
    projection: &str,
    partition: u32,
    from: Position,
    to: Position,
    events: &[RecordedEvent],
) -> tracing::Span {
    let shared = |id: fn(&RecordedEvent) -> Option<Uuid>| {
        let first = id(events.first()?)?;
        events.iter().all(|e| id(e) == Some(first)).then_some(tracing::field::display(first))
    };
    let span = tracing::info_span!(
        "batch",
        projection,
        partition,
        from = %from,
        to = %to,
        events = events.len(),
        correlation_id = shared(|e| e.metadata.correlation_id),
        causation_id = shared(|e| e.metadata.causation_id),
    );
    #[cfg(feature = "opentelemetry")]
    link_to_appends(&span, events);
    span
}

/// Links `span` to each event's appending span, the link carrying the event's id, stream,
/// version and its correlation and causation ids (a batch mixes events of many commands).
#[cfg(feature = "opentelemetry")]
fn link_to_appends(span: &tracing::Span, events: &[RecordedEvent]) {
    use opentelemetry::KeyValue;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if span.is_disabled() {
        return;
    }
    for event in events {
        let Some(parent) = event.metadata.traceparent else { continue };
        let mut attributes = vec![
            KeyValue::new("annal.event_id", event.id.to_string()),
            KeyValue::new("annal.stream", event.stream.to_string()),
            KeyValue::new("annal.version", event.version as i64),
        ];
        if let Some(id) = event.metadata.correlation_id {
            attributes.push(KeyValue::new("annal.correlation_id", id.to_string()));
        }
        if let Some(id) = event.metadata.causation_id {
            attributes.push(KeyValue::new("annal.causation_id", id.to_string()));
        }
        span.add_link_with_attributes(parent.span_context(), attributes);
    }
}
