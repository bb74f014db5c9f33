//! Content filters ([`annal::Predicate`]): every backend selects exactly what the memory store
//! selects, with generated events and predicates; values and keys are bound, never spliced.

use annal::{
    EventStore, ExpectedVersion, Filter, NewEvent, Position, Predicate, RecordedEvent, StreamName, SubscriptionOptions,
};
use futures::TryStreamExt;
use serde_json::json;
use uuid::Uuid;

use super::{PATIENCE, next_event, settle};

/// Reads every event `filter` selects after `from`, page by page, and where the reader ends.
async fn read_selected<S: EventStore>(store: &S, filter: &Filter, limit: usize) -> (Vec<Uuid>, Position) {
    let mut ids = Vec::new();
    let mut from = Position::START;
    loop {
        let page = store.read_all_page(from, filter, limit).await.unwrap();
        assert!(page.events.len() <= limit);
        ids.extend(page.events.iter().map(|e| e.id));
        if page.next == from {
            return (ids, from);
        }
        from = page.next;
    }
}

/// Generated events and predicates over keys that collide on purpose (the same numbers as
/// integers, floats and strings, nulls and missing keys, nested objects and arrays, keys with
/// dots, quotes and SQL in them): each SQL backend's filtered read and count select exactly the
/// events the memory store selects, and the reader ends at the head whatever it selected.
pub(crate) async fn content_filters_select_as_in_memory<S: EventStore>(store: S) {
    use proptest::strategy::{Strategy, ValueTree};
    let model = annal::MemoryEventStore::new();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let events = proptest::collection::vec(generated::data(), 1..6);
    let mut last = Position::START;
    for batch in 0..60 {
        let data = events.new_tree(&mut runner).unwrap().current();
        let ty = if batch % 3 == 0 { "Other" } else { "Data" };
        let batch_events: Vec<NewEvent> = data.into_iter().map(|d| NewEvent::new(ty, d)).collect();
        let s = StreamName::from_parts(if batch % 2 == 0 { "ride" } else { "driver" }, batch).unwrap();
        last = store.append(&s, ExpectedVersion::NoStream, batch_events.clone()).await.unwrap().position();
        model.append(&s, ExpectedVersion::NoStream, batch_events).await.unwrap();
    }
    let head = crate::support::visible(&store, last).await;
    let model_head = model.head().await.unwrap();
    let stored: Vec<RecordedEvent> = store.read_all(Position::START, Filter::all()).try_collect().await.unwrap();
    let predicates = generated::predicate();
    let mut selective = 0;
    for case in 0..160 {
        let predicate = predicates.new_tree(&mut runner).unwrap().current();
        let filter = if case % 4 == 0 {
            Filter::categories(["ride"]).with_event_types(["Data"]).with_data(predicate.clone())
        } else {
            Filter::all().with_data(predicate.clone())
        };
        let limit = [1, 7, 500][case % 3];
        let (got, end) = read_selected(&store, &filter, limit).await;
        let (want, model_end) = read_selected(&model, &filter, limit).await;
        if got != want {
            let by_id = |id: &Uuid| stored.iter().find(|e| e.id == *id).map(|e| e.data.to_string());
            let only_backend: Vec<_> = got.iter().filter(|id| !want.contains(id)).filter_map(by_id).collect();
            let only_memory: Vec<_> = want.iter().filter(|id| !got.contains(id)).filter_map(by_id).collect();
            panic!(
                "case {case}: {predicate:?}\nonly the backend selects {only_backend:?}\nonly memory selects {only_memory:?}"
            );
        }
        // The reader moved to the head even past events it did not select (a filtered
        // checkpoint keeps up).
        assert_eq!((end, model_end), (head, model_head), "case {case}");
        assert_eq!(store.count(Position::START, head, &filter).await.unwrap(), got.len() as u64, "case {case}");
        // Rust's evaluation of what the backend read back agrees too (the shared tail uses it).
        let in_rust: Vec<Uuid> = stored.iter().filter(|e| filter.matches(e)).map(|e| e.id).collect();
        assert_eq!(in_rust, got, "case {case}: {predicate:?} evaluated on the events read back");
        if !got.is_empty() && got.len() < stored.len() / 2 {
            selective += 1;
        }
    }
    // The generator is worth something: most predicates select some events but not most.
    assert!(selective >= 30, "only {selective} of 160 predicates were selective");
}

/// Keys and values that look like SQL or JSON-path syntax are data: they select exactly the
/// events that hold them, and the table is intact afterwards.
pub(crate) async fn content_filter_values_are_bound_not_spliced<S: EventStore>(store: S) {
    let nasty = [
        "'; DROP TABLE annal_events; --",
        "a'b",
        "a\"b",
        "a.b",
        "$.a",
        "[0]",
        "\\",
        "\\\"",
        "x') OR 1=1 OR ('",
        "$1",
        "?",
        "",
        "%",
        "\u{1}",
    ];
    let s = StreamName::new("nasty-1").unwrap();
    let batch: Vec<NewEvent> =
        nasty.iter().map(|key| NewEvent::new("Nasty", json!({ *key: { *key: *key } }))).collect();
    store.append(&s, ExpectedVersion::NoStream, batch).await.unwrap();
    let tail = StreamName::new("nasty-2").unwrap();
    store
        .append(&tail, ExpectedVersion::NoStream, vec![NewEvent::new("Plain", json!({ "a": { "b": 1 } }))])
        .await
        .unwrap();
    let head = settle(&store).await;
    let all: Vec<RecordedEvent> = store.read_all(Position::START, Filter::all()).try_collect().await.unwrap();
    for (i, key) in nasty.iter().enumerate() {
        for predicate in [
            Predicate::eq([*key, *key], *key),
            Predicate::eq([*key], ()).not().and(Predicate::eq([*key, *key], *key)),
            Predicate::one_of([*key, *key], [*key, "'", "\""]),
        ] {
            let filter = Filter::event_types(["Nasty"]).with_data(predicate.clone());
            let (got, _) = read_selected(&store, &filter, 100).await;
            assert_eq!(got, [all[i].id], "{key:?}: {predicate:?}");
            assert_eq!(store.count(Position::START, head, &filter).await.unwrap(), 1, "{key:?}");
        }
        // A value that is someone else's key selects nothing.
        let (got, _) = read_selected(&store, &Filter::all().with_data(Predicate::eq([*key], *key)), 100).await;
        assert!(got.is_empty(), "{key:?} selected {got:?}");
    }
    // "a.b" is one key, not a path: the plain event's a → b is not selected by it.
    let (got, _) = read_selected(&store, &Filter::all().with_data(Predicate::eq(["a.b", "a.b"], "a.b")), 100).await;
    assert_eq!(got, [all[3].id]);
    let (got, _) = read_selected(&store, &Filter::all().with_data(Predicate::eq(["a", "b"], 1)), 100).await;
    assert_eq!(got, [all[nasty.len()].id]);
    // Everything is still there.
    let again: Vec<RecordedEvent> = store.read_all(Position::START, Filter::all()).try_collect().await.unwrap();
    assert_eq!(again, all);
}

/// Subscriptions with content filters, some catching up from the start (read in the database)
/// and some following the head (the shared tail, in memory), each receive exactly the events
/// their predicate selects, in order, while writers append.
pub(crate) async fn content_filtered_subscriptions_get_exactly_their_events<S: EventStore + Clone + 'static>(store: S) {
    // A 10 × 10 grid, row by row.
    let point = |i: u64| json!({ "pickup": { "x": i % 10, "y": (i / 10) % 10 }, "i": i });
    let s = StreamName::new("ride-history").unwrap();
    store
        .append(&s, ExpectedVersion::NoStream, (0..30).map(|i| NewEvent::new("Requested", point(i))).collect())
        .await
        .unwrap();
    let middle = settle(&store).await;
    let boxes: Vec<Predicate> = (0..10u32)
        .map(|b| {
            let (x, y) = (f64::from(b % 5) * 2.0, f64::from(b / 5) * 5.0);
            Predicate::between(["pickup", "x"], x, x + 3.0).and(Predicate::between(["pickup", "y"], y, y + 4.0))
        })
        .collect();
    let done = Predicate::eq(["done"], true);
    let subscriptions: Vec<_> = boxes
        .iter()
        .enumerate()
        .map(|(i, area)| {
            let filter = Filter::event_types(["Requested", "Done"]).with_data(area.clone().or(done.clone()));
            let from = if i % 2 == 0 { Position::START } else { middle };
            let store = store.clone();
            tokio::spawn(async move {
                let mut sub = store.subscribe_with(from, filter.clone(), SubscriptionOptions::default().page_size(5));
                let mut got = Vec::new();
                loop {
                    let e = next_event(&mut sub).await;
                    if e.event_type == "Done" {
                        break;
                    }
                    got.push(e.id);
                }
                let expected: Vec<Uuid> = store
                    .read_all(from, Filter::all())
                    .try_collect::<Vec<RecordedEvent>>()
                    .await
                    .unwrap()
                    .into_iter()
                    .take_while(|e| e.event_type != "Done")
                    .filter(|e| filter.matches(e))
                    .map(|e| e.id)
                    .collect();
                (i, got, expected)
            })
        })
        .collect();
    for i in 30..130 {
        let s = StreamName::from_parts("ride", i).unwrap();
        store.append(&s, ExpectedVersion::NoStream, vec![NewEvent::new("Requested", point(i))]).await.unwrap();
    }
    let end = StreamName::new("ride-done").unwrap();
    store.append(&end, ExpectedVersion::NoStream, vec![NewEvent::new("Done", json!({ "done": true }))]).await.unwrap();
    for subscription in subscriptions {
        let (i, got, expected) =
            tokio::time::timeout(PATIENCE, subscription).await.expect("a subscription stalled").unwrap();
        assert_eq!(got, expected, "subscription {i}");
        assert!(!got.is_empty() && got.len() < 60, "subscription {i} got {}", got.len());
    }
}

mod generated {
    use annal::{Comparison, Predicate, Scalar};
    use proptest::prelude::*;
    use serde_json::{Number, Value};

    /// Keys that collide on purpose, some with dots, quotes and SQL in them.
    const KEYS: [&str; 6] = ["lat", "n", "a.b", "q\"k'", "x'); DROP TABLE annal_events; --", "\\"];

    fn key() -> impl Strategy<Value = String> {
        proptest::sample::select(&KEYS[..]).prop_map(str::to_owned)
    }

    /// Numbers that equal each other across representations, and arbitrary ones.
    fn number() -> impl Strategy<Value = f64> {
        prop_oneof![
            4 => (-3i32..4).prop_map(f64::from),
            1 => Just(0.5),
            1 => Just(-0.0),
            1 => Just(0.1),
            1 => Just(1e16),
            1 => Just(9_007_199_254_740_993u64 as f64),
            1 => Just(u64::MAX as f64),
            1 => Just(i64::MIN as f64),
            1 => Just(5e-324),
            1 => Just(f64::MAX),
            2 => any::<f64>().prop_filter("finite", |f| f.is_finite()),
        ]
    }

    fn json_number() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => (-3i64..4).prop_map(Value::from),
            1 => Just(Value::from(9_007_199_254_740_993u64)),
            1 => Just(Value::from(u64::MAX)),
            1 => Just(Value::from(i64::MIN)),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            4 => number().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => proptest::sample::select(&["5", "0", "-1", "0.5", "true", "null", "", "lat", "é", "a\"b"][..]).prop_map(str::to_owned),
            1 => key(),
            1 => "\\PC{0,6}",
        ]
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::from),
            4 => json_number(),
            2 => text().prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(2, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map(key(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An event's data: mostly objects over the colliding keys, sometimes a bare scalar or array.
    pub(super) fn data() -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => proptest::collection::btree_map(key(), value(), 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
            1 => value(),
        ]
    }

    /// Zero to two keys: the empty path is the data itself.
    fn path() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(key(), 0..3)
    }

    fn scalar() -> impl Strategy<Value = Scalar> {
        prop_oneof![
            1 => Just(Scalar::Null),
            1 => any::<bool>().prop_map(Scalar::Bool),
            4 => prop_oneof![number(), Just(f64::NAN)].prop_map(Scalar::Number),
            2 => text().prop_map(Scalar::String),
        ]
    }

    fn comparison() -> impl Strategy<Value = Comparison> {
        proptest::sample::select(&[Comparison::Lt, Comparison::Le, Comparison::Gt, Comparison::Ge][..])
    }

    pub(super) fn predicate() -> impl Strategy<Value = Predicate> {
        let threshold =
            prop_oneof![8 => number(), 1 => Just(f64::INFINITY), 1 => Just(f64::NEG_INFINITY), 1 => Just(f64::NAN)];
        let leaf = prop_oneof![
            (path(), scalar()).prop_map(|(path, value)| Predicate::Eq { path, value }),
            (path(), comparison(), threshold).prop_map(|(path, op, value)| Predicate::Compare { path, op, value }),
        ];
        leaf.prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Predicate::And),
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Predicate::Or),
                inner.prop_map(Predicate::not),
            ]
        })
    }
}
