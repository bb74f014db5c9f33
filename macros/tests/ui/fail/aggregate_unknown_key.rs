use annal::{Aggregate, Event};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened,
}

#[derive(Default, Aggregate)]
#[aggregate(event = AccountEvent, snapshots = 10)]
struct Account;

fn main() {}
