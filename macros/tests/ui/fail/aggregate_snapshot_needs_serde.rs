use annal::{Aggregate, Event};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened,
}

#[derive(Default, Aggregate)]
#[aggregate(event = AccountEvent, snapshot(every = 10))]
struct Account {
    balance: u64,
}

fn main() {}
