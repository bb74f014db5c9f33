// A typo in `#[aggregate(...)]` reports that typo only: the derive still implements
// `Aggregate` with the event type it found, so `impl Decide` and the repository compile.
use annal::{Aggregate, Decide, Event, MemoryEventStore, Repository};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    Deposited { amount: u64 },
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(categroy = "account", event = AccountEvent, id = u64)]
struct Account {
    balance: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("refused")]
struct Refused;

impl Decide for Account {
    type Command = u64;
    type Error = Refused;

    fn handle(&self, amount: u64) -> Result<Vec<AccountEvent>, Refused> {
        Ok(vec![AccountEvent::Deposited { amount }])
    }

    fn apply(&mut self, AccountEvent::Deposited { amount }: &AccountEvent) {
        self.balance += amount;
    }
}

fn main() {
    let accounts = Repository::<Account, _>::new(MemoryEventStore::new());
    let _ = Account::stream_name(&7);
    let _ = accounts;
}
