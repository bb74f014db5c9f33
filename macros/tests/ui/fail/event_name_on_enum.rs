use annal::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(name = "Account")]
enum AccountEvent {
    Opened,
}

fn main() {}
