//! The derive macros end to end: stored names, versions and upcasting of `#[derive(Event)]`,
//! the wiring of `#[derive(Aggregate)]`. (Their compile errors: `macros/tests/compile_errors.rs`.)
#![cfg(feature = "derive")]

use annal::{Aggregate, Event, EventStore, ExpectedVersion, MemoryEventStore, NewEvent, StreamName};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(version = 1)]
enum AccountEvent {
    #[event(name = "AccountOpened", version = 3)]
    #[event(upcast(from = 1, with = opened_v1_to_v2), upcast(from = 2, with = opened_v2_to_v3))]
    Opened {
        owner: String,
        currency: String,
        overdraft: u64,
    },
    Deposited(u64),
    #[event(name = "MoneyWithdrawn")]
    Withdrawn {
        amount: u64,
    },
    Closed,
}

/// Version 1 had `name` instead of `owner`.
fn opened_v1_to_v2(mut data: Value) -> Value {
    if let Some(name) = data.as_object_mut().and_then(|o| o.remove("name")) {
        data["owner"] = name;
    }
    data
}

/// Version 2 had no currency and no overdraft; they default to EUR and 0.
fn opened_v2_to_v3(mut data: Value) -> Result<Value, String> {
    let object = data.as_object_mut().ok_or("an object was expected")?;
    object.entry("currency").or_insert(json!("EUR"));
    object.entry("overdraft").or_insert(json!(0));
    Ok(data)
}

#[test]
fn stored_names_versions_and_data() {
    assert_eq!(AccountEvent::EVENT_TYPES, ["AccountOpened", "Deposited", "MoneyWithdrawn", "Closed"]);
    let opened = AccountEvent::Opened { owner: "ada".into(), currency: "EUR".into(), overdraft: 0 };
    assert_eq!((opened.event_type(), opened.schema_version()), ("AccountOpened", 3));
    assert_eq!(opened.to_data().unwrap(), json!({ "owner": "ada", "currency": "EUR", "overdraft": 0 }));
    let deposited = AccountEvent::Deposited(5);
    assert_eq!(
        (deposited.event_type(), deposited.schema_version(), deposited.to_data().unwrap()),
        ("Deposited", 1, json!(5))
    );
    assert_eq!(AccountEvent::Withdrawn { amount: 2 }.event_type(), "MoneyWithdrawn");
    assert_eq!(AccountEvent::Closed.to_data().unwrap(), Value::Null);
    for event in [opened, deposited, AccountEvent::Withdrawn { amount: 2 }, AccountEvent::Closed] {
        let back = AccountEvent::from_stored(event.event_type(), event.schema_version(), event.to_data().unwrap());
        assert_eq!(back.unwrap(), event);
    }
}

#[test]
fn old_versions_are_upcast_through_every_step() {
    let from_v1 = AccountEvent::from_stored("AccountOpened", 1, json!({ "name": "ada" })).unwrap();
    let from_v2 = AccountEvent::from_stored("AccountOpened", 2, json!({ "owner": "ada" })).unwrap();
    let current = AccountEvent::Opened { owner: "ada".into(), currency: "EUR".into(), overdraft: 0 };
    assert_eq!(from_v1, current);
    assert_eq!(from_v2, current);
}

#[test]
fn decode_failures_are_typed_errors() {
    let cases = [
        ("Nope", 1, json!({}), "unknown event type"),
        ("AccountOpened", 4, json!({}), "newer code"),
        ("AccountOpened", 2, json!("not an object"), "upcaster failed: an object was expected"),
        ("Deposited", 1, json!("five"), "invalid type"),
        ("MoneyWithdrawn", 0, json!({ "amount": 1 }), "no upcaster from version 0"),
    ];
    for (event_type, version, data, expected) in cases {
        match AccountEvent::from_stored(event_type, version, data) {
            Err(annal::Error::Decode { reason, event_type: stored, schema_version, .. }) => {
                assert!(reason.contains(expected), "{event_type}: {reason}");
                assert_eq!((stored.as_str(), schema_version), (event_type, version));
            }
            other => panic!("{event_type}: expected a decode error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_renamed_variant_still_reads_events_stored_under_the_old_name() {
    // Written by an older build whose variant was `Withdrawn` with the default name... which
    // was then pinned with #[event(name = "MoneyWithdrawn")] when the variant was renamed.
    let store = MemoryEventStore::new();
    let stream = StreamName::new("account-1").unwrap();
    let old = NewEvent::new("MoneyWithdrawn", json!({ "amount": 7 }));
    store.append(&stream, ExpectedVersion::NoStream, vec![old]).await.unwrap();
    let recorded = store.read_stream_page(&stream, annal::Direction::Forwards, 0, 1).await.unwrap();
    assert_eq!(AccountEvent::from_recorded(&recorded[0]).unwrap(), AccountEvent::Withdrawn { amount: 7 });
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, Aggregate)]
#[aggregate(category = "account", event = AccountEvent, id = u64, snapshot(every = 10, version = 2))]
struct Account {
    balance: u64,
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(event = AccountEvent)]
struct Ledger;

#[test]
fn aggregate_wiring() {
    assert_eq!(<Account as Aggregate>::CATEGORY, "account");
    assert_eq!(Account::stream_name(&42).unwrap().as_str(), "account-42");
    assert_eq!(Account::snapshot_policy(), annal::SnapshotPolicy::every(10).with_schema_version(2));
    let state = Account { balance: 9 };
    assert_eq!(Account::from_snapshot(state.to_snapshot().unwrap()).unwrap(), state);
    assert!(matches!(Account::from_snapshot(json!("junk")), Err(annal::Error::Decode { .. })));
    // Defaults: the lower-cased name, `str` ids, no snapshots.
    assert_eq!(<Ledger as Aggregate>::CATEGORY, "ledger");
    assert_eq!(Ledger::stream_name("main").unwrap().as_str(), "ledger-main");
    assert_eq!(Ledger::snapshot_policy(), annal::SnapshotPolicy::Never);
}

proptest::proptest! {
    /// Events stored at any old schema version read back equal to the same event written today.
    #[test]
    fn upcast_old_events_equal_freshly_written_ones(owner in ".{0,40}", version in 1..=3u32) {
        let fresh = AccountEvent::Opened { owner: owner.clone(), currency: "EUR".into(), overdraft: 0 };
        let stored = match version {
            1 => json!({ "name": owner }),
            2 => json!({ "owner": owner }),
            _ => fresh.to_data().unwrap(),
        };
        let read = AccountEvent::from_stored("AccountOpened", version, stored).unwrap();
        proptest::prop_assert_eq!(&read, &fresh);
        let rewritten = AccountEvent::from_stored(fresh.event_type(), fresh.schema_version(), fresh.to_data().unwrap());
        proptest::prop_assert_eq!(rewritten.unwrap(), read);
    }
}
