//! The collaborative-editing example's transformation (`examples/collab/ot.rs`), compiled here
//! so that its unit tests and its TP1 property test run with the suite.

#[path = "../examples/collab/ot.rs"]
#[allow(unreachable_pub, dead_code)]
mod ot;
