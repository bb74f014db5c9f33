//! Group commit on PostgreSQL: concurrent appends to different streams share one commit, and
//! each keeps exactly the result it would have got alone (docs/ordering.md, "Group commit").
//!
//! To build a group deterministically, the store gets one commit slot and an append that holds
//! it: that append waits on a row another transaction inserted and has not committed. The
//! appends under test then queue, the test sees them all queued, and releases the slot: they
//! are committed as one group.
#![cfg(feature = "postgres")]

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use annal::{
    AppendResult, Error, EventStore, ExpectedVersion, Filter, GroupCommit, MemoryEventStore, NewEvent, PgEventStore,
    Position, ReadStream, RecordedEvent, StreamName,
};
use futures::TryStreamExt;
use serde_json::json;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(30);

type Append = (StreamName, ExpectedVersion, Vec<NewEvent>);

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn events(n: usize) -> Vec<NewEvent> {
    (0..n).map(|i| NewEvent::new("Tested", json!({ "n": i }))).collect()
}

async fn store(grouping: Option<GroupCommit>) -> PgEventStore {
    PgEventStore::from_pool(support::pg::fresh_pool(20).await).await.unwrap().with_group_commit(grouping)
}

/// A store whose appends queue behind one commit at a time.
async fn one_slot_store() -> PgEventStore {
    store(Some(GroupCommit::new(64, 1).unwrap())).await
}

/// Polls `check` until it holds; fails the test after `PATIENCE`.
async fn until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `appends` as one group of `store` (which must have one commit slot), each from its own
/// task, and returns their results in the same order.
async fn in_one_group(store: &PgEventStore, appends: Vec<Append>) -> Vec<annal::Result<AppendResult>> {
    // Another transaction inserts `held-<n>`@0 and keeps it uncommitted; an append of the same
    // version takes the slot and waits on that row's unique key.
    let held = stream(&format!("held-{}", Uuid::now_v7().simple()));
    let mut blocker = store.pool().begin().await.unwrap();
    let blocker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *blocker).await.unwrap();
    sqlx::query(
        "INSERT INTO annal_events (event_id, stream, category, version, event_type, schema_version, data, metadata) \
         VALUES ($1, $2, 'held', 0, 'Held', 1, '{}', '{}')",
    )
    .bind(Uuid::now_v7())
    .bind(held.as_str())
    .execute(&mut *blocker)
    .await
    .unwrap();
    let holder = {
        let (store, held) = (store.clone(), held.clone());
        tokio::spawn(async move { store.append(&held, ExpectedVersion::NoStream, events(1)).await })
    };
    until("the slot's append waits on the uncommitted row", || async {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                .bind(blocker_pid)
                .fetch_one(store.pool())
                .await
                .unwrap();
        waiting > 0
    })
    .await;
    let n = appends.len();
    let tasks: Vec<_> = appends
        .into_iter()
        .map(|(s, expected, batch)| {
            let store = store.clone();
            tokio::spawn(async move { store.append(&s, expected, batch).await })
        })
        .collect();
    until("every append queued", || async { store.queued_appends() == n }).await;
    blocker.rollback().await.unwrap();
    assert_eq!(holder.await.unwrap().unwrap().version, 0);
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// The transactions that committed these successful appends.
fn transactions(results: &[annal::Result<AppendResult>]) -> HashSet<u64> {
    results.iter().flat_map(|r| r.as_ref().unwrap().positions.iter().map(|p| p.transaction())).collect()
}

async fn stream_events<S: EventStore>(store: &S, s: &StreamName) -> Vec<RecordedEvent> {
    store.read_stream(s, ReadStream::forwards()).try_collect().await.unwrap()
}

/// `stream`'s events as (id, version, data), for comparing backends.
async fn contents<S: EventStore>(store: &S, s: &StreamName) -> Vec<(Uuid, u64, serde_json::Value)> {
    stream_events(store, s).await.into_iter().map(|e| (e.id, e.version, e.data)).collect()
}

/// Every member of the group gets the result the in-memory store gives the same append alone,
/// each stream holds what the model holds, and what was acknowledged is stored where it was told.
async fn assert_as_alone(
    store: &PgEventStore,
    model: &MemoryEventStore,
    group: &[Append],
    results: &[annal::Result<AppendResult>],
) {
    for ((s, expected, batch), got) in group.iter().zip(results) {
        let want = model.append(s, *expected, batch.clone()).await;
        match (got, &want) {
            (Ok(got), Ok(want)) => {
                assert_eq!(
                    (got.version, got.already_written),
                    (want.version, want.already_written),
                    "{s} {expected:?}"
                );
                assert_eq!(got.positions.len(), batch.len(), "{s}");
                assert!(got.positions.windows(2).all(|p| p[0] < p[1]), "{s}: positions in batch order");
            }
            (Err(got), Err(want)) => assert_eq!(got.to_string(), want.to_string(), "{s} {expected:?}"),
            _ => panic!("{s} {expected:?}: grouped {got:?}, alone {want:?}"),
        }
    }
    for ((s, _, _), got) in group.iter().zip(results) {
        let stored = stream_events(store, s).await;
        assert_eq!(
            stored.iter().map(|e| (e.id, e.version, e.data.clone())).collect::<Vec<_>>(),
            contents(model, s).await,
            "{s}: the stream holds what it would hold had every append run alone"
        );
        if let Ok(got) = got {
            let at = stored.iter().find(|e| e.version == got.version).expect("the acknowledged version is stored");
            assert_eq!(Some(&at.position), got.positions.last(), "{s}: stored where the append was told");
        }
    }
}

/// The global log holds every stored event once, and each stream's versions rise along it.
async fn assert_gap_free(store: &PgEventStore) {
    let head = store.head().await.unwrap();
    support::visible(store, head).await;
    let log: Vec<RecordedEvent> = store.read_all(Position::START, Filter::all()).try_collect().await.unwrap();
    let ids: HashSet<Uuid> = log.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), log.len(), "every event once");
    assert!(log.windows(2).all(|w| w[0].position < w[1].position), "one increasing order");
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in &log {
        let previous = last.insert(e.stream.as_str(), e.version);
        assert_eq!(
            previous.map_or(0, |v| v + 1),
            e.version,
            "{}: versions rise along the global log, no gap",
            e.stream
        );
    }
}

/// Appends `batch` to both stores alike, returning the store's result.
async fn both(store: &PgEventStore, model: &MemoryEventStore, s: &StreamName, batch: Vec<NewEvent>) -> AppendResult {
    model.append(s, ExpectedVersion::Any, batch.clone()).await.unwrap();
    store.append(s, ExpectedVersion::Any, batch).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_member_fails_alone_and_the_rest_of_its_group_commits_in_one_transaction() {
    let store = one_slot_store().await;
    let model = MemoryEventStore::new();
    for (name, n) in [("short-1", 2), ("any-1", 3), ("exact-1", 2)] {
        both(&store, &model, &stream(name), events(n)).await;
    }
    // Two conflicts the statement's guards catch (the stream is shorter than expected, or
    // missing), beside appends that must commit.
    let mut group = vec![
        (stream("short-1"), ExpectedVersion::Exact(5), events(1)),
        (stream("absent-1"), ExpectedVersion::StreamExists, events(1)),
        (stream("any-1"), ExpectedVersion::Any, events(2)),
        (stream("exact-1"), ExpectedVersion::Exact(1), events(1)),
    ];
    for i in 0..6 {
        group.push((stream(&format!("fresh-{i}")), ExpectedVersion::NoStream, events(i % 3 + 1)));
    }
    let results = in_one_group(&store, group.clone()).await;
    assert!(
        matches!(&results[0], Err(Error::Conflict { expected: ExpectedVersion::Exact(5), actual: Some(1), .. })),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], Err(Error::Conflict { expected: ExpectedVersion::StreamExists, actual: None, .. })),
        "{:?}",
        results[1]
    );
    let commits = transactions(&results[2..]);
    assert_eq!(commits.len(), 1, "the eight other appends share one transaction: {commits:?}");
    assert_eq!(results[2].as_ref().unwrap().version, 4);
    assert_eq!(results[3].as_ref().unwrap().version, 2);
    assert_as_alone(&store, &model, &group, &results).await;
    assert_gap_free(&store).await;
}

/// The common group, every member one event at an exact version or to no stream, has a
/// statement of its own; its guards catch a stream shorter than expected, or a stream
/// expected at a version it does not have, and the others commit together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_single_exact_appends_commits_together_and_its_conflicts_fail_alone() {
    let store = one_slot_store().await;
    let model = MemoryEventStore::new();
    for (name, n) in [("short-2", 2), ("exact-2", 2), ("exact-3", 1)] {
        both(&store, &model, &stream(name), events(n)).await;
    }
    let mut group = vec![
        (stream("short-2"), ExpectedVersion::Exact(5), events(1)),
        (stream("missing-2"), ExpectedVersion::Exact(0), events(1)),
        (stream("exact-2"), ExpectedVersion::Exact(1), events(1)),
        (stream("exact-3"), ExpectedVersion::Exact(0), events(1)),
    ];
    for i in 0..4 {
        group.push((stream(&format!("fresh-2-{i}")), ExpectedVersion::NoStream, events(1)));
    }
    let results = in_one_group(&store, group.clone()).await;
    assert!(
        matches!(&results[0], Err(Error::Conflict { expected: ExpectedVersion::Exact(5), actual: Some(1), .. })),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], Err(Error::Conflict { expected: ExpectedVersion::Exact(0), actual: None, .. })),
        "{:?}",
        results[1]
    );
    let commits = transactions(&results[2..]);
    assert_eq!(commits.len(), 1, "the six other appends share one transaction: {commits:?}");
    assert_eq!(results[2].as_ref().unwrap().version, 2);
    assert_eq!(results[3].as_ref().unwrap().version, 1);
    assert_as_alone(&store, &model, &group, &results).await;
    assert_gap_free(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_break_the_groups_statement_get_their_own_results_and_the_others_commit() {
    let store = one_slot_store().await;
    let model = MemoryEventStore::new();
    let retried = events(2);
    let original = both(&store, &model, &stream("retried-1"), retried.clone()).await;
    both(&store, &model, &stream("taken-1"), events(1)).await;
    let elsewhere = both(&store, &model, &stream("elsewhere-1"), events(1)).await;
    let elsewhere_id = stream_events(&store, &stream("elsewhere-1")).await[0].id;
    // Each of the first three alone hits a unique key, which fails the whole statement.
    let mut group = vec![
        (stream("retried-1"), ExpectedVersion::NoStream, retried.clone()),
        (stream("taken-1"), ExpectedVersion::NoStream, events(1)),
        (stream("copied-1"), ExpectedVersion::NoStream, vec![NewEvent::new("Copy", json!({})).with_id(elsewhere_id)]),
    ];
    for i in 0..5 {
        group.push((stream(&format!("fresh-{i}")), ExpectedVersion::NoStream, events(2)));
    }
    let results = in_one_group(&store, group.clone()).await;
    let retry = results[0].as_ref().unwrap();
    assert!(retry.already_written, "an idempotent retry in a group");
    assert_eq!((retry.version, &retry.positions), (original.version, &original.positions), "its original result");
    assert!(matches!(&results[1], Err(Error::Conflict { actual: Some(0), .. })), "{:?}", results[1]);
    match &results[2] {
        Err(Error::DuplicateEvents { event_ids, written_at, .. }) => {
            assert_eq!(event_ids, &vec![elsewhere_id]);
            assert_eq!(written_at, &vec![("elsewhere-1".to_owned(), elsewhere.version)]);
        }
        other => panic!("{other:?}"),
    }
    assert_as_alone(&store, &model, &group, &results).await;
    assert_gap_free(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_to_one_stream_in_one_group_each_get_their_own_version() {
    let store = one_slot_store().await;
    let s = stream("shared-1");
    store.append(&s, ExpectedVersion::NoStream, events(1)).await.unwrap();
    let mut group: Vec<Append> = (0..4).map(|_| (s.clone(), ExpectedVersion::Any, events(2))).collect();
    group.push((s.clone(), ExpectedVersion::Exact(0), events(1)));
    group.push((stream("other-1"), ExpectedVersion::NoStream, events(1)));
    let results = in_one_group(&store, group.clone()).await;
    let stored = stream_events(&store, &s).await;
    let mut told = Vec::new();
    for ((_, expected, batch), result) in group.iter().zip(&results).take(5) {
        match result {
            Ok(r) => {
                let first = r.version + 1 - batch.len() as u64;
                for (i, e) in batch.iter().enumerate() {
                    let at = &stored[(first + i as u64) as usize];
                    assert_eq!((at.id, at.position), (e.id, r.positions[i]), "stored as told");
                }
                told.extend(first..=r.version);
            }
            Err(e) => assert!(e.is_conflict() && *expected == ExpectedVersion::Exact(0), "{e}"),
        }
    }
    assert!(results[..4].iter().all(Result::is_ok), "no Any append fails for a neighbour in its group");
    told.sort_unstable();
    assert_eq!(told, (1..stored.len() as u64).collect::<Vec<_>>(), "every version told once, none skipped");
    assert_gap_free(&store).await;
}

/// One generated member: the events its stream holds before, how it appends, and what.
#[derive(Clone, Debug)]
struct Member {
    before: usize,
    expected: ExpectedVersion,
    batch: usize,
    /// 0..=6 a fresh batch, 7..=8 a retry of the batch written before, 9 a fresh batch whose
    /// first id was written to another member's stream.
    kind: u8,
}

fn member() -> impl proptest::strategy::Strategy<Value = Member> {
    use proptest::prelude::*;
    let expected = prop_oneof![
        Just(ExpectedVersion::Any),
        Just(ExpectedVersion::StreamExists),
        Just(ExpectedVersion::NoStream),
        (0u64..4).prop_map(ExpectedVersion::Exact),
    ];
    (0usize..4, expected, 1usize..4, 0u8..10).prop_map(|(before, expected, batch, kind)| Member {
        before,
        expected,
        batch,
        kind,
    })
}

/// Generated groups (every expectation, streams of every length, idempotent retries of the
/// earlier batch consistent or not with the expectation, ids already used by another stream)
/// give each member the result the in-memory store gives it alone, and store the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_groups_give_every_member_its_result_alone() {
    groups_give_every_member_its_result_alone(member()).await;
}

/// The same for groups whose members each append one event at an exact version or to no
/// stream: the common group, which has a statement of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_groups_of_single_exact_appends_give_every_member_its_result_alone() {
    use proptest::prelude::*;
    let expected = prop_oneof![Just(ExpectedVersion::NoStream), (0u64..4).prop_map(ExpectedVersion::Exact)];
    // No idempotent retries or borrowed ids (kinds 7 to 9), which fail the whole statement.
    let one =
        (0usize..4, expected, 0u8..7).prop_map(|(before, expected, kind)| Member { before, expected, batch: 1, kind });
    groups_give_every_member_its_result_alone(one).await;
}

async fn groups_give_every_member_its_result_alone(member: impl proptest::strategy::Strategy<Value = Member>) {
    use proptest::strategy::{Strategy, ValueTree};
    let store = one_slot_store().await;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let groups = proptest::collection::vec(member, 2..10);
    for case in 0..24 {
        let members = groups.new_tree(&mut runner).unwrap().current();
        let model = MemoryEventStore::new();
        let mut written_before = Vec::new();
        for (m, member) in members.iter().enumerate() {
            let s = stream(&format!("case{case}-{m}"));
            let batch = events(member.before);
            if !batch.is_empty() {
                both(&store, &model, &s, batch.clone()).await;
            }
            written_before.push(batch);
        }
        let group: Vec<Append> = members
            .iter()
            .enumerate()
            .map(|(m, member)| {
                let s = stream(&format!("case{case}-{m}"));
                let mut batch = events(member.batch);
                if (7..=8).contains(&member.kind) && !written_before[m].is_empty() {
                    batch = written_before[m].clone();
                }
                let other = written_before.iter().enumerate().find(|(o, b)| *o != m && !b.is_empty());
                if let (9, Some((_, other))) = (member.kind, other) {
                    batch[0] = batch[0].clone().with_id(other[0].id);
                }
                (s, member.expected, batch)
            })
            .collect();
        let results = in_one_group(&store, group.clone()).await;
        assert_as_alone(&store, &model, &group, &results).await;
    }
    assert_gap_free(&store).await;
}

/// 40 writers on 40 streams of their own and 4 shared ones, in every expectation, through
/// groups: each stream ends with exactly the acknowledged appends, at the versions told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_writers_on_own_and_shared_streams_through_groups() {
    const WRITERS: usize = 40;
    const ROUNDS: u64 = 15;
    let store = store(Some(GroupCommit::new(64, 2).unwrap())).await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(WRITERS));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, start) = (store.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let (own, shared) = (stream(&format!("own-{w}")), stream(&format!("shared-{}", w % 4)));
                let mut acknowledged = Vec::new();
                for round in 0..ROUNDS {
                    let expected = match round {
                        0 => ExpectedVersion::NoStream,
                        r if r % 2 == 0 => ExpectedVersion::StreamExists,
                        r => ExpectedVersion::Exact(r - 1),
                    };
                    let batch = events(1);
                    let r = store.append(&own, expected, batch.clone()).await.unwrap();
                    assert_eq!(r.version, round, "{own}");
                    acknowledged.push((own.clone(), r.version, batch[0].id));
                    let batch = events(1);
                    let r = store.append(&shared, ExpectedVersion::Any, batch.clone()).await.unwrap();
                    acknowledged.push((shared.clone(), r.version, batch[0].id));
                }
                acknowledged
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    let mut by_stream: HashMap<StreamName, Vec<(u64, Uuid)>> = HashMap::new();
    for (s, version, id) in acknowledged {
        by_stream.entry(s).or_default().push((version, id));
    }
    assert_eq!(by_stream.len(), WRITERS + 4);
    for (s, mut told) in by_stream {
        told.sort_unstable();
        let stored: Vec<(u64, Uuid)> = stream_events(&store, &s).await.iter().map(|e| (e.version, e.id)).collect();
        assert_eq!(stored, told, "{s}: exactly the acknowledged appends, at the versions told");
    }
    assert_gap_free(&store).await;
}

/// The name the crash test's child process connects with, to find its sessions.
const CHILD_APPLICATION: &str = "annal-group-commit-crash-child";

/// The child of `a_process_killed_mid_group_keeps_every_acknowledged_append_and_no_part_of_another`:
/// 16 writers append 3-event batches to streams of their own through groups, forever, printing
/// each acknowledgement. Run only by that test, which kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the crash test"]
async fn crash_child() {
    use std::io::Write;
    let schema = std::env::var("ANNAL_CRASH_SCHEMA").expect("run by the crash test, which sets ANNAL_CRASH_SCHEMA");
    let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&support::pg::url())
        .unwrap()
        .options([("search_path", schema.as_str())])
        .application_name(CHILD_APPLICATION);
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(20).connect_with(options).await.unwrap();
    let store = PgEventStore::from_pool(pool).await.unwrap().with_group_commit(Some(GroupCommit::new(64, 2).unwrap()));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = stream(&format!("crash-{w}"));
                let mut version = None;
                loop {
                    let expected = version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
                    let r = store.append(&s, expected, events(3)).await.unwrap();
                    version = Some(r.version);
                    let positions: Vec<String> = r.positions.iter().map(ToString::to_string).collect();
                    let line = format!("ack {s} {} {}\n", r.version, positions.join(","));
                    std::io::stdout().lock().write_all(line.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    // The writers never end; one that fails (panics) ends the child with its error.
    futures::future::select_all(writers).await.0.unwrap();
}

/// A process appending through groups is killed with SIGKILL while groups are in flight: every
/// append it acknowledged is stored where it was told, every stored batch is whole, and each
/// stream's versions have no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_group_keeps_every_acknowledged_append_and_no_part_of_another() {
    use std::io::BufRead;
    let schema = format!("test_{}", Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&support::pg::url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&support::pg::url())
        .unwrap()
        .options([("search_path", schema.as_str())]);
    let store = PgEventStore::from_pool(sqlx::PgPool::connect_with(options).await.unwrap()).await.unwrap();

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("ANNAL_CRASH_SCHEMA", &schema)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ack ") && lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Kill it once it has acknowledged a few hundred appends: 16 writers keep groups in flight.
    let mut acks = Vec::new();
    while acks.len() < 400 {
        match lines.recv_timeout(PATIENCE) {
            Ok(line) => acks.push(line),
            Err(e) => panic!("the child stopped acknowledging after {} appends: {e}", acks.len()),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    acks.extend(lines.try_iter());
    // Its sessions end when the server notices; a statement it had sent may still commit.
    until("the killed child's sessions are gone", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(CHILD_APPLICATION)
            .fetch_one(&admin)
            .await
            .unwrap();
        left == 0
    })
    .await;

    let mut commits: HashMap<u64, usize> = HashMap::new();
    let mut told: HashMap<String, Vec<(u64, Vec<Position>)>> = HashMap::new();
    for ack in &acks {
        let parts: Vec<&str> = ack.split(' ').collect();
        let positions: Vec<Position> = parts[3].split(',').map(|p| p.parse().unwrap()).collect();
        *commits.entry(positions[0].transaction()).or_default() += 1;
        told.entry(parts[1].to_owned()).or_default().push((parts[2].parse().unwrap(), positions));
    }
    assert!(commits.values().any(|&n| n > 1), "appends were grouped before the kill");
    for w in 0..16 {
        let s = stream(&format!("crash-{w}"));
        let stored = stream_events(&store, &s).await;
        assert_eq!(stored.len() % 3, 0, "{s}: only whole batches are stored");
        for (i, e) in stored.iter().enumerate() {
            assert_eq!(e.version, i as u64, "{s}: no gap in versions");
        }
        for batch in stored.chunks(3) {
            assert!(
                batch.iter().all(|e| e.position.transaction() == batch[0].position.transaction()),
                "{s}: one commit"
            );
        }
        for (version, positions) in told.remove(s.as_str()).unwrap_or_default() {
            let at: Vec<Position> =
                stored[(version - 2) as usize..=version as usize].iter().map(|e| e.position).collect();
            assert_eq!(at, positions, "{s}@{version}: acknowledged, so stored where it was told");
        }
    }
    assert_gap_free(&store).await;
}
