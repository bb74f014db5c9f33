//! Derive macros for Annal: `#[derive(Event)]` and `#[derive(Aggregate)]` (being built).
