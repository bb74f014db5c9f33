//! Helpers for the tests that run `annal-runner` processes on a local SQLite database.
#![allow(dead_code, unreachable_pub)]

use std::process::Child;

use annal_eventstore::{EventStore, ExpectedVersion, NewEvent, SqliteEventStore, StreamName};
use serde_json::json;

/// A port nobody listens on now, for a runner's `listen` address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed (and reaped) when the test ends, passing or failing.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Appends one `Deposited` event per amount to `stream`.
pub async fn deposit(store: &SqliteEventStore, stream: &StreamName, amounts: &[i64]) {
    let events = amounts.iter().map(|a| NewEvent::new("Deposited", json!({ "amount": a }))).collect();
    store.append(stream, ExpectedVersion::Any, events).await.unwrap();
}

/// The stream of account `n`.
pub fn account(n: u32) -> StreamName {
    StreamName::from_parts("account", n).unwrap()
}
