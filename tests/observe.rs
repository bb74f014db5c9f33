//! What the store shows of itself, on every backend: the append latency histogram, scraped as
//! Prometheus text and parsed; with the `opentelemetry` feature, the trace context each event
//! keeps of the span that appended it, and the projection spans that link back to it.

mod support;

use annal::{EventStore, ExpectedVersion, NewEvent, StreamName};
use serde_json::json;

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

/// Runs `case` on a fresh store of every backend.
macro_rules! backends {
    ($($(#[$attr:meta])* $case:ident),* $(,)?) => {
        mod on_memory {
            $($(#[$attr])* #[tokio::test]
            async fn $case() { super::init(); super::$case(annal::MemoryEventStore::new(), "memory").await; })*
        }
        #[cfg(feature = "sqlite")]
        mod on_sqlite {
            $($(#[$attr])* #[tokio::test]
            async fn $case() {
                super::init();
                let dir = tempfile::tempdir().unwrap();
                let store = annal::SqliteEventStore::open(dir.path().join("events.db")).await.unwrap();
                super::$case(store, "sqlite").await;
            })*
        }
        #[cfg(feature = "postgres")]
        mod on_postgres {
            $($(#[$attr])* #[tokio::test]
            async fn $case() { super::init(); super::$case(crate::support::pg::fresh_store().await, "postgres").await; })*
        }
    };
}

backends!(
    appends_are_timed_per_backend_and_outcome,
    #[cfg(all(feature = "opentelemetry", feature = "projections"))]
    events_keep_the_appending_span_and_projection_spans_link_to_it,
    #[cfg(all(feature = "opentelemetry", feature = "projections", feature = "derive"))]
    commands_append_inside_a_span_that_shows_their_ids,
);

/// The samples of a Prometheus text exposition whose series name is `name` and whose labels
/// include every one of `labels`, summed.
/// Before a test touches a store: with OpenTelemetry, the global subscriber the span tests read
/// is installed first. A test that created a span (registered its callsite) while another was
/// installing the subscriber could leave that callsite disabled for every test of the binary,
/// and a span test would then find no spans: the race made this binary fail now and then.
fn init() {
    #[cfg(all(feature = "opentelemetry", feature = "projections"))]
    spans::exporter();
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}")))
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value.parse::<f64>().unwrap_or_else(|_| panic!("not a number: {value:?}")))
        .sum()
}

/// Two appends, a conflict and a refused event: each is one sample of the histogram, under its
/// backend and outcome, in buckets that add up to the count.
async fn appends_are_timed_per_backend_and_outcome<S: EventStore>(store: S, backend: &str) {
    use annal::metrics::{APPEND_BUCKETS, APPEND_DURATION};
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(APPEND_DURATION.into()), APPEND_BUCKETS)
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    // This thread's recorder: the test runs on a current-thread runtime, so every append's
    // future is polled here.
    let _recording = metrics::set_default_local_recorder(&recorder);
    let s = stream("timed-1");
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Exact(0)] {
        store.append(&s, expected, vec![NewEvent::new("Ticked", json!({}))]).await.unwrap();
    }
    let conflict = store.append(&s, ExpectedVersion::NoStream, vec![NewEvent::new("Ticked", json!({}))]).await;
    assert!(conflict.unwrap_err().is_conflict());
    assert!(store.append(&s, ExpectedVersion::Any, vec![NewEvent::new("", json!({}))]).await.is_err());

    let text = handle.render();
    let count = |outcome| {
        sample(&text, "annal_store_append_duration_seconds_count", &[("backend", backend), ("outcome", outcome)])
    };
    assert_eq!((count("ok"), count("conflict"), count("error")), (2.0, 1.0, 1.0), "{text}");
    assert!(text.contains("# TYPE annal_store_append_duration_seconds histogram"), "{text}");
    let ok = [("backend", backend), ("outcome", "ok")];
    let bucket = |le: &str| {
        let mut labels = ok.to_vec();
        labels.push(("le", le));
        sample(&text, "annal_store_append_duration_seconds_bucket", &labels)
    };
    assert!(bucket("0.0001") <= bucket("10") && bucket("10") <= bucket("+Inf"), "{text}");
    assert_eq!(bucket("+Inf"), 2.0, "{text}");
    assert!(sample(&text, "annal_store_append_duration_seconds_sum", &ok) > 0.0, "{text}");
}

#[cfg(all(feature = "opentelemetry", feature = "projections"))]
#[allow(dead_code)]
mod spans {
    use std::sync::OnceLock;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt;

    /// The spans every test of this binary exports; each test picks its own by trace id.
    pub(super) fn exporter() -> &'static InMemorySpanExporter {
        static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
        EXPORTER.get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            // The simple processor exports each span as it ends.
            let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("annal-tests"));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();
            exporter
        })
    }

    pub(super) fn finished(trace_id: u128) -> Vec<SpanData> {
        exporter()
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|span| u128::from_be_bytes(span.span_context.trace_id().to_bytes()) == trace_id)
            .collect()
    }

    /// The finished spans of `trace_id` once `done` says they are all there: a span ends when
    /// its last handle is dropped, which may be just after the call that used it returned.
    /// Fails after a patience that only a bug exhausts.
    pub(super) async fn finished_when(trace_id: u128, done: impl Fn(&[SpanData]) -> bool) -> Vec<SpanData> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let spans = finished(trace_id);
            if done(&spans) {
                return spans;
            }
            assert!(std::time::Instant::now() < deadline, "the spans never finished: {spans:#?}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub(super) fn span_id(span: &SpanData) -> u64 {
        u64::from_be_bytes(span.span_context.span_id().to_bytes())
    }
}

/// Counts what it is given, so that the test knows when the batch ran.
#[cfg(all(feature = "opentelemetry", feature = "projections"))]
struct Seen(std::sync::Mutex<usize>);

#[cfg(all(feature = "opentelemetry", feature = "projections"))]
#[annal::async_trait]
impl annal::projections::Projection for Seen {
    fn name(&self) -> &str {
        "seen"
    }
    fn delivery(&self) -> annal::projections::Delivery {
        annal::projections::Delivery::AtLeastOnce
    }
    async fn handle(
        &self,
        events: &[annal::RecordedEvent],
        _tx: &mut annal::projections::Tx<'_>,
    ) -> Result<(), annal::BoxError> {
        *self.0.lock().unwrap() += events.len();
        Ok(())
    }
}

/// An append inside a request span: its events keep the trace context of the store's
/// `annal.append` span, a child of the request's; an event that brought its own context keeps
/// it. A projection applying them runs in a `batch` span that links to each appending span,
/// the link naming the event and its correlation id.
#[cfg(all(feature = "opentelemetry", feature = "projections"))]
async fn events_keep_the_appending_span_and_projection_spans_link_to_it<S: EventStore + 'static>(
    store: S,
    backend: &str,
) {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use annal::projections::{MemoryProjectionStore, ProjectionRunner, WorkerOptions};
    use annal::{Filter, Metadata, Position, TraceParent};
    use futures::TryStreamExt;
    use opentelemetry::Value;
    use tracing::Instrument;

    const PATIENCE: Duration = Duration::from_secs(30);
    spans::exporter();
    let request = tracing::info_span!("request");
    let request_id = TraceParent::of(&request).expect("the OpenTelemetry layer records the request span");
    let trace = request_id.trace_id();
    let correlation = uuid::Uuid::now_v7();
    let supplied: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap();
    let s = stream("traced-1");
    let events = vec![
        NewEvent::new("Traced", json!({})).with_metadata(Metadata::default().with_correlation_id(correlation)),
        NewEvent::new("Traced", json!({})).with_metadata(Metadata::default().with_traceparent(supplied)),
    ];
    store.append(&s, ExpectedVersion::NoStream, events).instrument(request.clone()).await.unwrap();
    // Outside any span: the store's span starts a trace of its own.
    let untraced = stream("untraced-1");
    store.append(&untraced, ExpectedVersion::NoStream, vec![NewEvent::new("Plain", json!({}))]).await.unwrap();
    drop(request);

    let read: Vec<_> = store.read_stream(&s, annal::ReadStream::forwards()).try_collect().await.unwrap();
    let kept = read[0].metadata.traceparent.expect("the appended event keeps a traceparent");
    assert_eq!(read[1].metadata.traceparent, Some(supplied), "a caller-supplied context is kept");
    let plain: Vec<_> = store.read_stream(&untraced, annal::ReadStream::forwards()).try_collect().await.unwrap();
    let own = plain[0].metadata.traceparent.expect("an append outside any span is traced too");
    assert_ne!(own.trace_id(), trace);
    spans::finished_when(own.trace_id(), |f| {
        f.iter().any(|s| s.name == "annal.append" && spans::span_id(s) == own.span_id())
    })
    .await;
    assert_eq!(kept.trace_id(), trace, "{backend}: the request's trace");
    let finished = spans::finished_when(trace, |f| f.iter().any(|s| spans::span_id(s) == kept.span_id())).await;
    let append = finished.iter().find(|s| spans::span_id(s) == kept.span_id()).expect("the appending span is exported");
    assert_eq!(append.name, "annal.append");
    assert_eq!(u64::from_be_bytes(append.parent_span_id.to_bytes()), request_id.span_id());
    assert!(
        append.attributes.iter().any(|kv| kv.key.as_str() == "backend" && kv.value == Value::from(backend.to_owned()))
    );

    // A projection over the store: its batch span links to the append.
    let store: Arc<dyn EventStore> = Arc::new(store);
    let seen = Arc::new(Seen(std::sync::Mutex::new(0)));
    let running = ProjectionRunner::new(store.clone(), Arc::new(MemoryProjectionStore::new()))
        .with(seen.clone(), WorkerOptions::default())
        .unwrap()
        .start();
    let last =
        store.read_all(Position::START, Filter::all()).try_collect::<Vec<_>>().await.unwrap().last().unwrap().position;
    running.wait_for("seen", last, PATIENCE).await.unwrap();
    assert_eq!(*seen.0.lock().unwrap(), 3);
    // The batch span ends after the checkpoint moved: wait for its export.
    let deadline = Instant::now() + PATIENCE;
    let link = loop {
        let batches: Vec<_> = spans::exporter()
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|span| span.name == "batch")
            .flat_map(|span| span.links.links.clone())
            .filter(|link| u128::from_be_bytes(link.span_context.trace_id().to_bytes()) == trace)
            .collect();
        if let Some(link) =
            batches.into_iter().find(|l| u64::from_be_bytes(l.span_context.span_id().to_bytes()) == kept.span_id())
        {
            break link;
        }
        assert!(Instant::now() < deadline, "no batch span links to the append");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let attribute = |key: &str| link.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string());
    assert_eq!(attribute("annal.event_id"), Some(read[0].id.to_string()));
    assert_eq!(attribute("annal.correlation_id"), Some(correlation.to_string()));
    assert_eq!(attribute("annal.stream").as_deref(), Some("traced-1"));
    running.shutdown().await.unwrap();
}

#[cfg(all(feature = "opentelemetry", feature = "projections", feature = "derive"))]
mod counter {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, annal::Event)]
    pub(super) enum Counted {
        Added,
    }

    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, annal::Aggregate)]
    #[aggregate(category = "counter", event = Counted, id = u64)]
    pub(super) struct Counter;

    impl annal::Decide for Counter {
        type Command = ();
        type Error = std::convert::Infallible;

        fn handle(&self, (): ()) -> Result<Vec<Counted>, Self::Error> {
            Ok(vec![Counted::Added])
        }

        fn apply(&mut self, _: &Counted) {}
    }
}

/// A command through the repository: its events keep the context of an `annal.append` span
/// inside the `annal.command` span, which shows the command's correlation and causation ids and
/// sits inside the caller's span.
#[cfg(all(feature = "opentelemetry", feature = "projections", feature = "derive"))]
async fn commands_append_inside_a_span_that_shows_their_ids<S: EventStore + 'static>(store: S, _backend: &str) {
    use annal::{Metadata, Repository, TraceParent};
    use tracing::Instrument;

    spans::exporter();
    let request = tracing::info_span!("request");
    let request_id = TraceParent::of(&request).unwrap();
    let (correlation, causation) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let metadata = Metadata::default().with_correlation_id(correlation).with_causation_id(causation);
    let repository = Repository::<counter::Counter, _>::new(store);
    let executed = repository.execute_with(&7, (), metadata).instrument(request).await.unwrap();
    let event = repository.store().read_event(executed.events[0].id).await.unwrap().unwrap();
    let kept = event.metadata.traceparent.expect("the command's event keeps a traceparent");
    assert_eq!(kept.trace_id(), request_id.trace_id());
    let finished = spans::finished_when(kept.trace_id(), |f| {
        f.iter().any(|s| spans::span_id(s) == kept.span_id()) && f.iter().any(|s| s.name == "annal.command")
    })
    .await;
    let by_id = |id: u64| finished.iter().find(|s| spans::span_id(s) == id).unwrap_or_else(|| panic!("{finished:#?}"));
    let append = by_id(kept.span_id());
    assert_eq!(append.name, "annal.append");
    let command = by_id(u64::from_be_bytes(append.parent_span_id.to_bytes()));
    assert_eq!(command.name, "annal.command");
    assert_eq!(u64::from_be_bytes(command.parent_span_id.to_bytes()), request_id.span_id());
    let attribute =
        |key: &str| command.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string());
    assert_eq!(attribute("correlation_id"), Some(correlation.to_string()));
    assert_eq!(attribute("causation_id"), Some(causation.to_string()));
}
