// A typo in one attribute reports that typo only: the derive still implements `Event` (with
// unreachable bodies), so the aggregate, its `Decide` impl and the repository that use the
// enum compile without a cascade of unsatisfied trait bounds.
use annal::{Aggregate, Decide, Event, Filter, MemoryEventStore, RecordedEvent, Repository};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(nmae = "AccountOpened")]
    Opened { owner: String },
    Deposited { amount: u64 },
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(category = "account", event = AccountEvent, id = u64)]
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

    fn apply(&mut self, event: &AccountEvent) {
        if let AccountEvent::Deposited { amount } = event {
            self.balance += amount;
        }
    }
}

fn decode(recorded: &RecordedEvent) -> annal::Result<AccountEvent> {
    AccountEvent::from_recorded(recorded)
}

fn main() {
    let _accounts = Repository::<Account, _>::new(MemoryEventStore::new());
    let _filter = Filter::event_types(AccountEvent::EVENT_TYPES);
    let _ = decode;
}
