use annal::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(name = "")]
    Opened,
    #[event(name = "Closed\n")]
    Closed,
}

fn main() {}
