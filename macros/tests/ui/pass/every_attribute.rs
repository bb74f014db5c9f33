//! Every attribute of both derives, in a crate that denies warnings.
#![deny(warnings)]

use annal::{Aggregate, Event};
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn v1_to_v2(data: Value) -> Value {
    data
}

fn v2_to_v3(data: Value) -> Result<Value, std::convert::Infallible> {
    Ok(data)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(version = 2, prefix = "shop.")]
pub enum OrderEvent {
    #[event(name = "OrderPlaced", version = 3, upcast(from = 1, with = v1_to_v2))]
    #[event(upcast(from = 2, with = crate::v2_to_v3))]
    Placed { lines: Vec<String> },
    Paid(u64),
    #[event(version = 1)]
    Cancelled,
}

#[derive(Debug, Default, Serialize, Deserialize, Aggregate)]
#[aggregate(category = "order", event = OrderEvent, id = u64, snapshot(every = 50, version = 3))]
pub struct Order {
    lines: Vec<String>,
}

#[derive(Default, Serialize, Deserialize, Aggregate)]
#[aggregate(event = OrderEvent)]
#[aggregate(snapshot(every = 1))]
pub struct Unit;

#[derive(Default, Aggregate)]
#[aggregate(event = crate::OrderEvent, category = "tuple")]
pub struct Tuple(u64);

fn main() {
    assert_eq!(OrderEvent::EVENT_TYPES, ["shop.OrderPlaced", "shop.Paid", "shop.Cancelled"]);
    assert_eq!(OrderEvent::Paid(1).schema_version(), 2);
    assert_eq!(<Order as Aggregate>::CATEGORY, "order");
    let _ = Tuple(1).0;
}
