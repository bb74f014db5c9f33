//! The derive macros' compile errors point at the mistake, and every attribute compiles in a
//! crate that denies warnings (trybuild).
//!
//! These cases live in the macros crate, whose only dependency on Annal is the facade with just
//! `derive`: trybuild builds its own copy of the dependencies, and without a database backend
//! that copy is a fraction of the workspace's.

#[test]
fn compile_errors_point_at_the_mistake() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
