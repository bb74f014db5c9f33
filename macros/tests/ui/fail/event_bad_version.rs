use annal::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = "2")]
    Opened,
    #[event(version = 0)]
    Closed,
}

fn main() {}
