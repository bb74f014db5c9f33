use annal::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    Deposited { amount: u64 },
    #[event(name = "Deposited")]
    DepositedTwice { amount: u64 },
}

fn main() {}
