//! Operational transformation of text edits: pure functions, no I/O. The rule is in the
//! example's header and in `docs/collab.md`; its tests run with the suite (`tests/collab_ot.rs`).

use serde::{Deserialize, Serialize};

/// One change to a text. Positions and lengths count characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Insert `text` before the character at `at` (`at` = length: append).
    Insert {
        /// Where.
        at: usize,
        /// What.
        text: String,
    },
    /// Delete `len` characters from `at`.
    Delete {
        /// From where.
        at: usize,
        /// How many.
        len: usize,
    },
    /// Nothing: an insert that landed inside text deleted concurrently.
    Noop,
}

/// An operation and the client (site) that made it, which breaks ties between inserts at
/// the same position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edit {
    /// The client's id.
    pub site: u32,
    /// The change.
    pub op: Op,
}

/// An operation that does not fit the text it is applied to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the operation reaches character {reach}, the text has {len}")]
pub struct OutOfRange {
    /// The last position the operation needs.
    pub reach: usize,
    /// The text's length in characters.
    pub len: usize,
}

/// The byte offset of character `at`, or `None` past the end.
fn byte_of(text: &str, at: usize) -> Option<usize> {
    text.char_indices().map(|(i, _)| i).chain([text.len()]).nth(at)
}

/// Applies `op` to `text`.
///
/// # Errors
/// [`OutOfRange`] if the operation reaches past the end of the text; the text is unchanged.
pub fn apply(text: &mut String, op: &Op) -> Result<(), OutOfRange> {
    let len = || text.chars().count();
    match op {
        Op::Insert { at, text: inserted } => {
            let byte = byte_of(text, *at).ok_or_else(|| OutOfRange { reach: *at, len: len() })?;
            text.insert_str(byte, inserted);
        }
        Op::Delete { at, len: n } => {
            let reach = at.saturating_add(*n);
            let (Some(from), Some(to)) = (byte_of(text, *at), byte_of(text, reach)) else {
                return Err(OutOfRange { reach, len: len() });
            };
            text.replace_range(from..to, "");
        }
        Op::Noop => {}
    }
    Ok(())
}

/// `a` rewritten to apply after `b`, both made on the same text (see the example's header
/// for the rule). `a` and `b` come from different sites.
pub fn transform(a: &Edit, b: &Edit) -> Edit {
    let op = match (&a.op, &b.op) {
        (_, Op::Noop) | (Op::Noop, _) => a.op.clone(),
        (Op::Insert { at, text }, Op::Insert { at: other, text: inserted }) => {
            if at < other || (at == other && a.site < b.site) {
                a.op.clone()
            } else {
                Op::Insert { at: at + inserted.chars().count(), text: text.clone() }
            }
        }
        (Op::Insert { at, text }, Op::Delete { at: from, len }) => {
            if at <= from {
                a.op.clone()
            } else if *at >= from + len {
                Op::Insert { at: at - len, text: text.clone() }
            } else {
                Op::Noop
            }
        }
        (Op::Delete { at, len }, Op::Insert { at: other, text }) => {
            let inserted = text.chars().count();
            if other <= at {
                Op::Delete { at: at + inserted, len: *len }
            } else if *other >= at + len {
                a.op.clone()
            } else {
                Op::Delete { at: *at, len: len + inserted }
            }
        }
        (Op::Delete { at, len }, Op::Delete { at: from, len: deleted }) => {
            // Where a position ends up once `b`'s range is gone.
            let map = |p: usize| {
                if p <= *from {
                    p
                } else if p <= from + deleted {
                    *from
                } else {
                    p - deleted
                }
            };
            let (start, end) = (map(*at), map(at + len));
            Op::Delete { at: start, len: end - start }
        }
    };
    Edit { site: a.site, op }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ins(site: u32, at: usize, text: &str) -> Edit {
        Edit { site, op: Op::Insert { at, text: text.into() } }
    }

    fn del(site: u32, at: usize, len: usize) -> Edit {
        Edit { site, op: Op::Delete { at, len } }
    }

    /// Both orders of two concurrent edits, each transformed against the other.
    fn both_orders(text: &str, a: &Edit, b: &Edit) -> (String, String) {
        let (mut ab, mut ba) = (text.to_owned(), text.to_owned());
        apply(&mut ab, &a.op).unwrap();
        apply(&mut ab, &transform(b, a).op).unwrap();
        apply(&mut ba, &b.op).unwrap();
        apply(&mut ba, &transform(a, b).op).unwrap();
        (ab, ba)
    }

    #[test]
    fn the_rule_case_by_case() {
        let text = "hello world";
        // (a, b, what both orders give)
        let cases = [
            (ins(1, 0, ">"), ins(2, 11, "!"), ">hello world!"),
            (ins(1, 5, "A"), ins(2, 5, "B"), "helloAB world"),
            (ins(2, 5, "B"), ins(1, 5, "A"), "helloAB world"),
            (ins(1, 8, "X"), del(2, 0, 6), "woXrld"),
            (ins(1, 3, "X"), del(2, 1, 4), "h world"),
            (ins(1, 1, "X"), del(2, 1, 4), "hX world"),
            (ins(1, 5, "X"), del(2, 1, 4), "hX world"),
            (del(1, 0, 5), del(2, 3, 5), "rld"),
            (del(1, 2, 2), del(2, 0, 11), ""),
            (del(1, 6, 5), del(2, 6, 5), "hello "),
            (del(1, 0, 0), ins(2, 0, "X"), "Xhello world"),
        ];
        for (a, b, expected) in cases {
            let (ab, ba) = both_orders(text, &a, &b);
            assert_eq!((ab.as_str(), ba.as_str()), (expected, expected), "{a:?} with {b:?}");
        }
    }

    #[test]
    fn an_insert_inside_a_concurrent_delete_becomes_a_noop() {
        assert_eq!(transform(&ins(1, 3, "X"), &del(2, 1, 4)).op, Op::Noop);
        assert_eq!(transform(&del(2, 1, 4), &ins(1, 3, "X")).op, Op::Delete { at: 1, len: 5 });
        assert_eq!(transform(&ins(1, 3, "X"), &Edit { site: 2, op: Op::Noop }), ins(1, 3, "X"));
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let mut text = String::from("héllo");
        apply(&mut text, &Op::Delete { at: 1, len: 1 }).unwrap();
        apply(&mut text, &Op::Insert { at: 1, text: "é".into() }).unwrap();
        assert_eq!(text, "héllo");
    }

    #[test]
    fn an_operation_past_the_end_is_refused_and_changes_nothing() {
        let mut text = String::from("abc");
        assert_eq!(apply(&mut text, &Op::Insert { at: 4, text: "x".into() }), Err(OutOfRange { reach: 4, len: 3 }));
        assert_eq!(apply(&mut text, &Op::Delete { at: 2, len: 2 }), Err(OutOfRange { reach: 4, len: 3 }));
        assert_eq!(apply(&mut text, &Op::Delete { at: usize::MAX, len: 2 }).map_err(|e| e.len), Err(3));
        assert_eq!(text, "abc");
    }

    /// A text and an edit that fits it.
    fn edit_on(len: usize, site: u32) -> impl Strategy<Value = Edit> {
        prop_oneof![
            (0..=len, "[A-Z]{1,3}").prop_map(move |(at, text)| Edit { site, op: Op::Insert { at, text } }),
            (0..=len)
                .prop_flat_map(move |at| (Just(at), 0..=len - at))
                .prop_map(move |(at, n)| Edit { site, op: Op::Delete { at, len: n } }),
            Just(Edit { site, op: Op::Noop }),
        ]
    }

    proptest! {
        /// TP1: `a` then `transform(b, a)` equals `b` then `transform(a, b)`.
        #[test]
        fn two_concurrent_edits_converge_in_either_order(
            (text, a, b) in "[a-zé]{0,12}".prop_flat_map(|text| {
                let len = text.chars().count();
                (Just(text), edit_on(len, 1), edit_on(len, 2))
            }),
            swap in any::<bool>(),
        ) {
            let (a, b) = if swap { (b, a) } else { (a, b) };
            let (ab, ba) = both_orders(&text, &a, &b);
            prop_assert_eq!(ab, ba);
        }
    }
}
