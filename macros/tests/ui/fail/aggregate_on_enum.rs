use annal::Aggregate;

#[derive(Aggregate)]
enum Account {
    Open,
    Closed,
}

fn main() {}
