//! Wake-ups: how a backend tells its subscribers, after a commit, that the log may have grown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::Position;
use crate::tail::Tail;

/// What the notifier has sent: a count of wake-ups, and what they announced.
#[derive(Clone, Copy, Debug, Default)]
struct Signal {
    /// Every wake-up.
    count: u64,
    /// Wake-ups that did not say which events they announce (from another process without a
    /// position, or after a lost connection): a reader cannot know when it has seen them.
    unknown: u64,
    /// The furthest position announced: reading up to it sees every announced event.
    up_to: Position,
}

/// What a reader learns from the wake-ups it has received: either the position it must reach
/// to have seen every announced event, or that some wake-up did not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Announced {
    /// Every wake-up since the reader last asked named its events; reading up to here sees them.
    UpTo(Position),
    /// Some wake-up did not say what it announced.
    Unknown,
}

/// The sending side of wake-ups: a backend calls [`Notifier::notify`] after a commit.
///
/// Notifications coalesce: a subscriber that was busy sees one wake-up however many commits
/// happened meanwhile.
///
/// It also carries the store's recent log, shared by all its subscriptions (see
/// [`crate::EventStore::subscribe`]).
#[derive(Clone, Debug)]
pub struct Notifier {
    sender: Arc<watch::Sender<Signal>>,
    tail: Arc<Tail>,
}

impl Notifier {
    /// A notifier nobody listens to yet.
    pub fn new() -> Self {
        Notifier { sender: Arc::new(watch::Sender::new(Signal::default())), tail: Arc::default() }
    }

    /// Wakes every [`Wakeup`] made from this notifier, without saying what was committed: the
    /// woken readers re-poll quickly for a while, in case the new events are not visible yet.
    pub fn notify(&self) {
        self.sender.send_modify(|s| {
            s.count = s.count.wrapping_add(1);
            s.unknown = s.unknown.wrapping_add(1);
        });
    }

    /// Wakes every [`Wakeup`] made from this notifier for events committed up to `position`: a
    /// woken reader that has read that far has seen them, and need not re-poll.
    pub fn notify_up_to(&self, position: Position) {
        self.sender.send_modify(|s| {
            s.count = s.count.wrapping_add(1);
            s.up_to = s.up_to.max(position);
        });
    }

    /// A new receiver of wake-ups.
    pub fn subscribe(&self) -> Wakeup {
        let receiver = self.sender.subscribe();
        let seen_unknown = receiver.borrow().unknown;
        Wakeup { receiver, tail: self.tail.clone(), seen_unknown }
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

/// The receiving side of wake-ups, one per subscriber.
#[derive(Debug)]
pub struct Wakeup {
    receiver: watch::Receiver<Signal>,
    pub(crate) tail: Arc<Tail>,
    /// The notifier's count of unknown wake-ups when [`Wakeup::announced`] last looked.
    seen_unknown: u64,
}

impl Wakeup {
    /// How many wake-ups the notifier has sent.
    pub(crate) fn latest(&self) -> u64 {
        self.receiver.borrow().count
    }

    /// What the wake-ups received since the last call announced.
    pub(crate) fn announced(&mut self) -> Announced {
        let signal = *self.receiver.borrow();
        if std::mem::replace(&mut self.seen_unknown, signal.unknown) == signal.unknown {
            Announced::UpTo(signal.up_to)
        } else {
            Announced::Unknown
        }
    }

    /// Forgets wake-ups received so far; call it before reading, so that a commit that races
    /// with the read still wakes the next [`Wakeup::wait`].
    pub fn mark_seen(&mut self) {
        self.receiver.borrow_and_update();
    }

    /// Waits for a wake-up newer than the last [`Wakeup::mark_seen`], or `timeout`. Returns
    /// `true` if woken.
    pub async fn wait(&mut self, timeout: Duration) -> bool {
        match tokio::time::timeout(timeout, self.receiver.changed()).await {
            Ok(Ok(())) => true,
            Err(_elapsed) => false,
            // The notifier is gone: only polling is left.
            Ok(Err(_closed)) => {
                tokio::time::sleep(timeout).await;
                false
            }
        }
    }
}
