//! Wake-ups: how a backend tells its subscribers, after a commit, that the log may have grown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::tail::Tail;

/// The sending side of wake-ups: a backend calls [`Notifier::notify`] after a commit.
///
/// Notifications coalesce: a subscriber that was busy sees one wake-up however many commits
/// happened meanwhile.
///
/// It also carries the store's recent log, shared by all its subscriptions (see
/// [`crate::EventStore::subscribe`]).
#[derive(Clone, Debug)]
pub struct Notifier {
    sender: Arc<watch::Sender<u64>>,
    tail: Arc<Tail>,
}

impl Notifier {
    /// A notifier nobody listens to yet.
    pub fn new() -> Self {
        Notifier { sender: Arc::new(watch::Sender::new(0)), tail: Arc::default() }
    }

    /// Wakes every [`Wakeup`] made from this notifier.
    pub fn notify(&self) {
        self.sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A new receiver of wake-ups.
    pub fn subscribe(&self) -> Wakeup {
        Wakeup { receiver: self.sender.subscribe(), tail: self.tail.clone() }
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
    receiver: watch::Receiver<u64>,
    pub(crate) tail: Arc<Tail>,
}

impl Wakeup {
    /// How many wake-ups the notifier has sent.
    pub(crate) fn latest(&self) -> u64 {
        *self.receiver.borrow()
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
