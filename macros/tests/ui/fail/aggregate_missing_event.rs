use annal::Aggregate;

#[derive(Default, Aggregate)]
#[aggregate(category = "account")]
struct Account {
    balance: u64,
}

fn main() {}
