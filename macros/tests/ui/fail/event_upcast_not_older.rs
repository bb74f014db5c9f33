use annal::Event;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn upgrade(data: Value) -> Value {
    data
}

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(version = 2, upcast(from = 2, with = upgrade))]
    Opened,
}

fn main() {}
