use annal::{Aggregate, Event};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened,
}

#[derive(Default, Aggregate)]
#[aggregate(event = AccountEvent, snapshot(every = 0))]
struct Account;

#[derive(Default, Aggregate)]
#[aggregate(event = AccountEvent, snapshot(version = 2))]
struct Ledger;

fn main() {}
