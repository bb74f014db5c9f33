//! Declarative SQL projections on PostgreSQL apply a batch in one statement, through a function
//! per handler (`SqlProjection::install_postgres`). The promise: the read model is exactly what
//! one statement per event gives, for any events, in any order, with failing events parked
//! alike; and a function that goes missing costs speed, never an event.
#![cfg(all(feature = "runner", feature = "postgres"))]

mod support;

use std::sync::Arc;
use std::time::Duration;

use annal::projections::PgProjectionStore;
use annal::projections::{OnFailure, ProjectionRunner, RetryPolicy, WorkerOptions};
use annal::runner::{Config, SqlProjection};
use annal::{EventStore, ExpectedVersion, NewEvent, PgEventStore, Position, StreamName};
use proptest::prelude::*;
use serde_json::json;
use sqlx::PgPool;

const PATIENCE: Duration = Duration::from_secs(60);

/// A projection named `name` writing tables `{name}_accounts` and `{name}_log`. Every handler
/// depends on what the events before it wrote (a running product, a sequence number counted
/// from the rows so far), so an event applied out of order, twice or not at all shows; and
/// together they bind every parameter type.
fn projection(name: &str) -> SqlProjection {
    let text = format!(
        r#"
database = "postgres://unused"
[[projection]]
name = "{name}"
categories = ["acct"]
batch_size = 50
[projection.handlers]
Opened = "INSERT INTO {name}_accounts (id, n, trail) VALUES (:stream_id, 1, :category) ON CONFLICT (id) DO UPDATE SET trail = {name}_accounts.trail || 'o'"
Added = "UPDATE {name}_accounts SET n = (n * 3 + (:data ->> 'd')::bigint) % 1000003, trail = trail || ',' || :version WHERE id = :stream_id"
Noted = "INSERT INTO {name}_log (seq, weight, event_id, stream, position, event_type, schema_version, metadata, recorded_at) VALUES ((SELECT count(*) FROM {name}_log), (:data ->> 'w')::int, :event_id, :stream, :position, :event_type, :schema_version, :metadata, :recorded_at)"
"#
    );
    SqlProjection::new(&Config::parse(&text).unwrap().projections[0]).unwrap()
}

async fn create_tables(pool: &PgPool, name: &str) {
    for sql in [
        format!("CREATE TABLE {name}_accounts (id text PRIMARY KEY, n bigint NOT NULL, trail text NOT NULL)"),
        format!(
            "CREATE TABLE {name}_log (seq bigint PRIMARY KEY, weight int NOT NULL, event_id uuid NOT NULL, stream text NOT NULL, position text \
             NOT NULL, event_type text NOT NULL, schema_version bigint NOT NULL, metadata jsonb NOT NULL, recorded_at \
             timestamptz NOT NULL)"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await.unwrap();
    }
}

/// The read model of projection `name`, as text, in a fixed order.
async fn read_model(pool: &PgPool, name: &str) -> (Vec<String>, Vec<String>) {
    let rows = |sql: String| async move {
        sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await.unwrap()
    };
    (
        rows(format!("SELECT t::text FROM {name}_accounts t ORDER BY id")).await,
        rows(format!(
            "SELECT (seq, weight, event_id, stream, position, event_type, schema_version, metadata, recorded_at)::text \
             FROM {name}_log ORDER BY seq"
        ))
        .await,
    )
}

/// An event of kind 0 (opened), 1 (added), 2 (noted) or 3 (a note whose weight is not a number:
/// its statement fails, so it is parked, and its stream's later events behind it).
fn event(kind: u8, n: usize) -> NewEvent {
    match kind {
        0 => NewEvent::new("Opened", json!({})),
        1 => NewEvent::new("Added", json!({ "d": n })),
        2 => NewEvent::new("Noted", json!({ "w": n }))
            .with_metadata(annal::Metadata::default().with_correlation_id(uuid::Uuid::from_u128(n as u128))),
        _ => NewEvent::new("Noted", json!({ "w": "not a number" })),
    }
}

fn options() -> WorkerOptions {
    WorkerOptions::default()
        .retry(RetryPolicy::default().attempts(2).initial(Duration::from_millis(1)))
        .on_failure(OnFailure::Park)
}

/// Appends `events` (stream, kind) in appends of up to 7, runs `batched` (installed) and
/// `plain` (not) to the end, and returns the parked events' ids of each.
async fn apply_both(store: &PgEventStore, events: &[(u8, u8)]) -> (Vec<uuid::Uuid>, Vec<uuid::Uuid>) {
    let mut last = Position::START;
    for (i, chunk) in events.chunks(7).enumerate() {
        for &(stream, kind) in chunk {
            let s = StreamName::new(format!("acct-{stream}")).unwrap();
            let written = store.append(&s, ExpectedVersion::Any, vec![event(kind, i)]).await.unwrap();
            last = last.max(written.position());
        }
    }
    let projections = PgProjectionStore::new(store).await.unwrap();
    let running = ProjectionRunner::new(Arc::new(store.clone()), Arc::new(projections.clone()))
        .with(Arc::new(batched_projection(store).await), options())
        .unwrap()
        .with(Arc::new(projection("plain")), options())
        .unwrap()
        .start();
    for name in ["batched", "plain"] {
        // Parked events are compared below.
        match running.wait_for(name, last, PATIENCE).await {
            Ok(()) | Err(annal::projections::Error::Parked { .. }) => {}
            Err(error) => panic!("{name}: {error}"),
        }
    }
    running.shutdown().await.unwrap();
    let parked = async |name| {
        let mut ids: Vec<_> = annal::projections::ProjectionStore::dead_letters(&projections, name)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.event_id)
            .collect();
        ids.sort();
        ids
    };
    (parked("batched").await, parked("plain").await)
}

async fn batched_projection(store: &PgEventStore) -> SqlProjection {
    let batched = projection("batched");
    batched.install_postgres(store.pool()).await.unwrap();
    assert!(batched.batches_in_one_statement());
    batched
}

async fn fresh() -> PgEventStore {
    let store = support::pg::fresh_store().await;
    create_tables(store.pool(), "batched").await;
    create_tables(store.pool(), "plain").await;
    store
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Any events, in batches of up to 50: the batched projection's rows and dead letters are
    /// the ones a statement per event gives.
    #[test]
    fn a_batch_in_one_statement_writes_what_a_statement_per_event_writes(
        events in prop::collection::vec((0u8..4, prop_oneof![60 => 0u8..3, 1 => Just(3u8)]), 1..240)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let store = fresh().await;
            let (batched, plain) = apply_both(&store, &events).await;
            assert_eq!(batched, plain, "parked events");
            let failing = events.iter().filter(|(_, kind)| *kind == 3).count();
            assert_eq!(batched.is_empty(), failing == 0);
            assert_eq!(read_model(store.pool(), "batched").await, read_model(store.pool(), "plain").await);
            store.close().await;
        });
    }
}

/// A handler function dropped under a running projection: the batch that meets its absence is
/// retried event by event with plain statements, nothing is parked or lost, and the projection
/// goes on one statement per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_handler_function_costs_speed_never_an_event() {
    let store = fresh().await;
    let batched = Arc::new(batched_projection(&store).await);
    let projections = PgProjectionStore::new(&store).await.unwrap();
    let running = ProjectionRunner::new(Arc::new(store.clone()), Arc::new(projections.clone()))
        .with(batched.clone(), options())
        .unwrap()
        .start();
    let s = StreamName::new("acct-1").unwrap();
    let first = store.append(&s, ExpectedVersion::NoStream, vec![event(0, 0), event(1, 1)]).await.unwrap();
    running.wait_for("batched", first.position(), PATIENCE).await.unwrap();
    // Every function of the projection, dropped.
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE 'annal_handler_%' AND pronamespace = current_schema()::regnamespace",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(functions.len(), 3, "{functions:?}");
    for function in &functions {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP FUNCTION {function}"))).execute(store.pool()).await.unwrap();
    }
    let events: Vec<NewEvent> = (2..40).map(|n| event((n % 3) as u8, n)).collect();
    let last = store.append(&s, ExpectedVersion::Exact(1), events).await.unwrap();
    running.wait_for("batched", last.position(), PATIENCE).await.unwrap();
    running.shutdown().await.unwrap();
    assert!(!batched.batches_in_one_statement());
    assert!(annal::projections::ProjectionStore::dead_letters(&projections, "batched").await.unwrap().is_empty());
    let (accounts, log) = read_model(store.pool(), "batched").await;
    assert_eq!((accounts.len(), log.len()), (1, 13), "{accounts:?}");
    // Installing again (the next start) brings the functions back.
    batched.install_postgres(store.pool()).await.unwrap();
    assert!(batched.batches_in_one_statement());
}

/// Runners starting together install the same functions at once: each succeeds, and one set
/// of functions exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_installing_at_once_all_succeed() {
    let store = fresh().await;
    let projections: Vec<SqlProjection> = (0..6).map(|_| projection("batched")).collect();
    let installs = projections.iter().map(|p| p.install_postgres(store.pool()));
    for result in futures::future::join_all(installs).await {
        result.unwrap();
    }
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc WHERE proname LIKE 'annal_handler_%' AND pronamespace = current_schema()::regnamespace",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(count, 3);
    assert!(projections.iter().all(SqlProjection::batches_in_one_statement));
}
