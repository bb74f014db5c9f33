use annal::{Aggregate, Event};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    Opened,
}

#[derive(Default, Aggregate)]
#[aggregate(category = "bank-account", event = AccountEvent)]
struct Account;

fn main() {}
