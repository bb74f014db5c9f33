use annal::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 2, version = 3)]
    Opened,
}

fn main() {}
