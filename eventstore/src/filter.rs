//! Selecting events from the global log.

use crate::RecordedEvent;

/// Which events a global read or a subscription wants: a selective consumer.
///
/// `Filter::event_types(AccountEvent::EVENT_TYPES)` selects every event type of a
/// `#[derive(Event)]` enum.
///
/// An event matches when its stream's category is one of `categories` (or that list is empty)
/// and its type is one of `event_types` (or that list is empty). [`Filter::all`] matches
/// everything.
///
/// ```
/// use annal_eventstore::Filter;
///
/// let filter = Filter::categories(["account"]).with_event_types(["Deposited", "Withdrawn"]);
/// assert!(!filter.is_all());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    categories: Vec<String>,
    event_types: Vec<String>,
}

impl Filter {
    /// Every event.
    pub fn all() -> Self {
        Filter::default()
    }

    /// Events of streams in these categories.
    pub fn categories<I: IntoIterator<Item = S>, S: AsRef<str>>(categories: I) -> Self {
        Filter { categories: collect(categories), event_types: Vec::new() }
    }

    /// Events of these types.
    pub fn event_types<I: IntoIterator<Item = S>, S: AsRef<str>>(types: I) -> Self {
        Filter { categories: Vec::new(), event_types: collect(types) }
    }

    /// Narrows the filter to these event types as well.
    pub fn with_event_types<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, types: I) -> Self {
        self.event_types = collect(types);
        self
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
        self.categories.is_empty() && self.event_types.is_empty()
    }

    /// Whether `event` is selected.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        self.matches_parts(event.stream.category(), &event.event_type)
    }

    pub(crate) fn matches_parts(&self, category: &str, event_type: &str) -> bool {
        (self.categories.is_empty() || self.categories.iter().any(|c| c == category))
            && (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type))
    }
}

fn collect<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I) -> Vec<String> {
    let mut items: Vec<String> = items.into_iter().map(|s| s.as_ref().to_owned()).collect();
    items.sort();
    items.dedup();
    items
}
