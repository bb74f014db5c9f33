use annal::{Aggregate, Event};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened,
}

#[derive(Default, Aggregate)]
#[aggregate(event = AccountEvent)]
#[aggregate(event = AccountEvent, category = "a", category = "b")]
struct Account;

fn main() {}
