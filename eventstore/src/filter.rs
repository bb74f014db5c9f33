//! Selecting events from the global log.

use crate::{Predicate, RecordedEvent, StreamName};

/// Which events a global read or a subscription wants: a selective consumer.
///
/// `Filter::event_types(AccountEvent::EVENT_TYPES)` selects every event type of a
/// `#[derive(Event)]` enum.
///
/// An event matches when its stream's category is one of `categories` (or that list is empty),
/// its type is one of `event_types` (or that list is empty) and, for a filter narrowed with
/// [`Filter::with_partition`], its stream is in that partition and, for a filter narrowed with
/// [`Filter::with_data`], its data satisfies that [`Predicate`]. [`Filter::all`] matches
/// everything.
///
/// ```
/// use annal_eventstore::Filter;
///
/// let filter = Filter::categories(["account"]).with_event_types(["Deposited", "Withdrawn"]);
/// assert!(!filter.is_all());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    categories: Vec<String>,
    event_types: Vec<String>,
    partition: Option<(u32, u32)>,
    data: Option<Predicate>,
}

impl Filter {
    /// Every event.
    pub fn all() -> Self {
        Filter::default()
    }

    /// Events of streams in these categories.
    pub fn categories<I: IntoIterator<Item = S>, S: AsRef<str>>(categories: I) -> Self {
        Filter { categories: collect(categories), ..Filter::default() }
    }

    /// Events of these types.
    pub fn event_types<I: IntoIterator<Item = S>, S: AsRef<str>>(types: I) -> Self {
        Filter { event_types: collect(types), ..Filter::default() }
    }

    /// Narrows the filter to these event types as well.
    pub fn with_event_types<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, types: I) -> Self {
        self.event_types = collect(types);
        self
    }

    /// Narrows the filter to the streams of partition `index` of `count` ([`partition_of`]):
    /// competing consumers each read their own share of the log, in the database. A `count` of
    /// 0 or 1 means every stream; an `index` not below `count` selects nothing.
    ///
    /// ```
    /// use annal_eventstore::{Filter, StreamName, partition_of};
    ///
    /// let stream = StreamName::new("account-42").unwrap();
    /// let mine = Filter::all().with_partition(partition_of(&stream, 4), 4);
    /// assert_eq!(mine.partition(), Some((partition_of(&stream, 4), 4)));
    /// ```
    pub fn with_partition(mut self, index: u32, count: u32) -> Self {
        self.partition = (count > 1).then_some((index, count));
        self
    }

    /// Narrows the filter to events whose data satisfies `predicate` (replacing an earlier one):
    /// a selective consumer by content, evaluated in the database on PostgreSQL and SQLite
    /// ([`Predicate`] has the rules and where each backend evaluates them).
    ///
    /// ```
    /// use annal_eventstore::{Filter, Predicate};
    ///
    /// let big = Filter::event_types(["OrderPlaced"]).with_data(Predicate::ge(["total"], 100.0));
    /// assert_eq!(big.data(), Some(&Predicate::ge(["total"], 100.0)));
    /// ```
    pub fn with_data(mut self, predicate: Predicate) -> Self {
        self.data = Some(predicate);
        self
    }

    /// The condition on the data (`None`: any data).
    pub fn data(&self) -> Option<&Predicate> {
        self.data.as_ref()
    }

    /// The partition selected, `(index, count)` (`None`: every stream).
    pub fn partition(&self) -> Option<(u32, u32)> {
        self.partition
    }

    /// The categories selected (empty: any).
    pub fn category_list(&self) -> &[String] {
        &self.categories
    }

    /// The event types selected (empty: any).
    pub fn event_type_list(&self) -> &[String] {
        &self.event_types
    }

    /// `true` when the filter selects every event.
    pub fn is_all(&self) -> bool {
        self.categories.is_empty() && self.event_types.is_empty() && self.partition.is_none() && self.data.is_none()
    }

    /// Whether `event` is selected.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        let category = event.stream.category();
        (self.categories.is_empty() || self.categories.iter().any(|c| c == category))
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
            && self.partition.is_none_or(|(index, count)| partition_of(&event.stream, count) == index)
            && self.data.as_ref().is_none_or(|predicate| predicate.matches(&event.data))
    }
}

/// A stream's hash for partitioning: the 64-bit FNV-1a hash of its name, mixed by MurmurHash3's
/// finaliser so that every bit depends on every input bit, and cut to its high 32 bits (FNV's
/// low bits alone split badly modulo small odd counts). Stable across processes, machines and
/// versions; stored with each event so that databases can select a partition.
pub(crate) fn stream_hash(stream: &StreamName) -> u32 {
    let fnv = stream
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
    let mut k = fnv;
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    u32::try_from(k >> 32).unwrap_or_default()
}

/// The partition of a stream among `partitions`: its [hash](Filter::with_partition) modulo the
/// count, so each stream's events always go to the same partition and keep their order.
pub fn partition_of(stream: &StreamName, partitions: u32) -> u32 {
    stream_hash(stream) % partitions.max(1)
}

fn collect<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I) -> Vec<String> {
    let mut items: Vec<String> = items.into_iter().map(|s| s.as_ref().to_owned()).collect();
    items.sort();
    items.dedup();
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        let stream = |i: u32| StreamName::from_parts("account", i).unwrap();
        // Stored with every event: a change would move streams between partitions. (Checked
        // against an independent FNV-1a implementation.)
        assert_eq!(stream_hash(&StreamName::new("account-1").unwrap()), 0x4ea9_6e94);
        assert_eq!(partition_of(&stream(1), 1), 0);
        for partitions in [2u32, 3, 4, 7] {
            let mut counts = vec![0u32; partitions as usize];
            for i in 0..4000 {
                counts[partition_of(&stream(i), partitions) as usize] += 1;
            }
            let fair = 4000 / partitions;
            assert!(counts.iter().all(|c| c.abs_diff(fair) < fair / 5), "{partitions}: {counts:?}");
        }
    }
}
