//! A given/when/then test kit for aggregates, for ordinary `#[test]` functions.
//!
//! ```
//! # use annal_eventstore::*;
//! # #[derive(Debug, Clone, PartialEq)] enum CounterEvent { Added(u64) }
//! # impl Event for CounterEvent {
//! #     const EVENT_TYPES: &'static [&'static str] = &["Added"];
//! #     fn event_type(&self) -> &'static str { "Added" }
//! #     fn schema_version(&self) -> u32 { 1 }
//! #     fn to_data(&self) -> Result<serde_json::Value> { let CounterEvent::Added(n) = self; Ok((*n).into()) }
//! #     fn from_stored(_: &str, _: u32, data: serde_json::Value) -> Result<Self> { Ok(CounterEvent::Added(data.as_u64().unwrap_or_default())) }
//! # }
//! # #[derive(Debug, PartialEq, thiserror::Error)] #[error("too big")] struct TooBig;
//! # #[derive(Default, Debug)] struct Counter { total: u64 }
//! # impl Aggregate for Counter { const CATEGORY: &'static str = "counter"; type Id = u32; type Event = CounterEvent; }
//! # impl Decide for Counter {
//! #     type Command = u64; type Error = TooBig;
//! #     fn handle(&self, add: u64) -> std::result::Result<Vec<CounterEvent>, TooBig> { if self.total + add > 100 { Err(TooBig) } else { Ok(vec![CounterEvent::Added(add)]) } }
//! #     fn apply(&mut self, CounterEvent::Added(n): &CounterEvent) { self.total += n; }
//! # }
//! use annal_eventstore::testing::given;
//!
//! given::<Counter>([CounterEvent::Added(60)]).when(30).then([CounterEvent::Added(30)]);
//! given::<Counter>([CounterEvent::Added(60)]).when(50).then_error(TooBig);
//! ```

use std::fmt::Debug;

use crate::Decide;

/// Starts a test from the aggregate's past events.
pub fn given<A: Decide>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in events {
        state.apply(&event);
    }
    Given { state }
}

/// An aggregate rebuilt from its past events; say what happens next with [`Given::when`].
#[derive(Debug)]
#[must_use = "a test needs a `.when(command)` and a `.then...`"]
pub struct Given<A> {
    state: A,
}

impl<A: Decide> Given<A> {
    /// Runs `command` against the state.
    pub fn when(self, command: A::Command) -> Then<A> {
        let outcome = self.state.handle(command);
        Then { state: self.state, outcome }
    }

    /// The state the past events built, for assertions of your own.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// The outcome of a command; check it with one of the `then` methods, which panic with a
/// readable diff when it differs.
#[derive(Debug)]
#[must_use = "a test needs a `.then...` to check anything"]
pub struct Then<A: Decide> {
    state: A,
    outcome: Result<Vec<A::Event>, A::Error>,
}

impl<A: Decide> Then<A>
where
    A::Event: Debug + PartialEq,
    A::Error: Debug,
{
    /// Asserts that the command was accepted with exactly these events, in order. Returns the
    /// state after them.
    ///
    /// # Panics
    /// If the command was refused or decided other events.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.outcome {
            Ok(actual) if actual == expected => {
                let mut state = self.state;
                actual.iter().for_each(|e| state.apply(e));
                state
            }
            Ok(actual) => panic!("the command decided other events than expected:\n{}", diff(&expected, &actual)),
            Err(error) => {
                panic!("the command was refused with {error:?}, but these events were expected:\n{expected:#?}")
            }
        }
    }

    /// Asserts that the command was accepted and decided nothing.
    ///
    /// # Panics
    /// If it was refused or decided events.
    #[track_caller]
    pub fn then_nothing(self) -> A {
        self.then([])
    }

    /// Asserts that the command was refused with `expected`.
    ///
    /// # Panics
    /// If it was accepted or refused with another error.
    #[track_caller]
    pub fn then_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.outcome {
            Err(actual) if actual == expected => {}
            Err(actual) => panic!("the command was refused with another error:\n{}", diff(&expected, &actual)),
            Ok(events) => panic!("the command was accepted with {events:#?}, but {expected:?} was expected"),
        }
    }

    /// Asserts that the command was refused with an error `check` accepts (for errors without
    /// `PartialEq`).
    ///
    /// # Panics
    /// If it was accepted, or `check` returns `false`.
    #[track_caller]
    pub fn then_error_matches(self, check: impl FnOnce(&A::Error) -> bool) {
        match self.outcome {
            Err(actual) if check(&actual) => {}
            Err(actual) => panic!("the command was refused with an unexpected error: {actual:?}"),
            Ok(events) => panic!("the command was accepted with {events:#?}, but an error was expected"),
        }
    }
}

/// A unified diff of the pretty-printed values, `-` expected, `+` actual.
fn diff(expected: &impl Debug, actual: &impl Debug) -> String {
    let (expected, actual) = (format!("{expected:#?}\n"), format!("{actual:#?}\n"));
    similar::TextDiff::from_lines(&expected, &actual)
        .unified_diff()
        .context_radius(3)
        .header("expected", "actual")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Aggregate, Event, Result};

    #[derive(Debug, Clone, PartialEq)]
    enum Ev {
        Added(u64),
    }
    impl Event for Ev {
        const EVENT_TYPES: &'static [&'static str] = &["Added"];
        fn event_type(&self) -> &'static str {
            "Added"
        }
        fn schema_version(&self) -> u32 {
            1
        }
        fn to_data(&self) -> Result<serde_json::Value> {
            let Ev::Added(n) = self;
            Ok((*n).into())
        }
        fn from_stored(_: &str, _: u32, data: serde_json::Value) -> Result<Self> {
            Ok(Ev::Added(data.as_u64().unwrap_or_default()))
        }
    }
    #[derive(Debug, PartialEq, thiserror::Error)]
    #[error("full")]
    struct Full;
    #[derive(Default, Debug)]
    struct Counter(u64);
    impl Aggregate for Counter {
        const CATEGORY: &'static str = "counter";
        type Id = u32;
        type Event = Ev;
    }
    impl Decide for Counter {
        type Command = u64;
        type Error = Full;
        fn handle(&self, add: u64) -> std::result::Result<Vec<Ev>, Full> {
            match add {
                0 => Ok(vec![]),
                _ if self.0 + add > 10 => Err(Full),
                _ => Ok(vec![Ev::Added(add)]),
            }
        }
        fn apply(&mut self, Ev::Added(n): &Ev) {
            self.0 += n;
        }
    }

    #[test]
    fn passing_cases() {
        assert_eq!(given::<Counter>([Ev::Added(2)]).when(3).then([Ev::Added(3)]).0, 5);
        given::<Counter>([]).when(0).then_nothing();
        given::<Counter>([Ev::Added(9)]).when(2).then_error(Full);
        given::<Counter>([Ev::Added(9)]).when(2).then_error_matches(|e| e.to_string() == "full");
    }

    #[test]
    fn a_mismatch_panics_with_a_diff() {
        let panic = std::panic::catch_unwind(|| given::<Counter>([]).when(3).then([Ev::Added(4)])).unwrap_err();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(message.contains("-    Added(\n-        4,") || message.contains("-        4,"), "{message}");
        assert!(message.contains("+        3,"), "{message}");
        let panic =
            std::panic::catch_unwind(|| given::<Counter>([Ev::Added(9)]).when(3).then([Ev::Added(3)])).unwrap_err();
        assert!(panic.downcast_ref::<String>().unwrap().contains("refused with Full"));
        let panic = std::panic::catch_unwind(|| given::<Counter>([]).when(3).then_error(Full)).unwrap_err();
        assert!(panic.downcast_ref::<String>().unwrap().contains("accepted"));
    }
}
