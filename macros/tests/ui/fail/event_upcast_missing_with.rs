use annal::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 2, upcast(from = 1))]
    Opened,
}

fn main() {}
