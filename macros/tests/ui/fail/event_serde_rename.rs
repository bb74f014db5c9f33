use annal::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[serde(rename = "opened")]
    Opened,
}

fn main() {}
