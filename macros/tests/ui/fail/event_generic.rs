use annal::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent<T> {
    Opened(T),
}

fn main() {}
