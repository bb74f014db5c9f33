//! Derive macros for Annal, re-exported by the `annal` crate behind its `derive` feature.
//!
//! - `#[derive(Event)]` on an enum: one variant per event type, with stable stored names,
//!   schema versions and upcasters.
//! - `#[derive(Aggregate)]` on a struct: the stream category, event type, id type and snapshot
//!   policy of an aggregate.
//!
//! The generated code names `::annal`, so depend on the `annal` crate (not on this one). See the
//! `annal` crate's documentation and `docs/aggregates.md` for the attributes.

mod aggregate;
mod ctxt;
mod event;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Implements `annal::Event` for an enum of events.
///
/// The enum must also derive `serde::Serialize` and `serde::Deserialize` (externally tagged,
/// the default). Attributes, all under `#[event(...)]`:
///
/// - on the enum: `version = N` (the default schema version, 1 if not given) and
///   `prefix = "..."` (prepended to every stored name);
/// - on a variant: `name = "..."` (the stored name; the variant's identifier if not given),
///   `version = N`, and `upcast(from = N, with = path::to::function)`, once per old version,
///   where the function turns a version-N payload (`serde_json::Value`) into a version-N+1 one,
///   returning `Value` or `Result<Value, E: Display>`.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    event::derive(&input).unwrap_or_else(|error| with_fallback(error, event::fallback(&input))).into()
}

/// Implements `annal::Aggregate` for a struct holding an aggregate's state.
///
/// Attributes, all under `#[aggregate(...)]`: `event = Type` (required), `category = "..."`
/// (the lower-cased struct name if not given), `id = Type` (`str` if not given, so ids are
/// passed as `&str`) and
/// `snapshot(every = N, version = M)` (the struct must then also derive `serde::Serialize`
/// and `serde::Deserialize`). The behaviour, `handle` and `apply`, is yours to write in an
/// `impl annal::Decide`.
#[proc_macro_derive(Aggregate, attributes(aggregate))]
pub fn derive_aggregate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    aggregate::derive(&input).unwrap_or_else(|error| with_fallback(error, aggregate::fallback(&input))).into()
}

/// The errors, plus an implementation that satisfies the trait without doing anything (its
/// bodies are unreachable: the build fails on the errors). Without it, every use of the type
/// as an event or an aggregate would fail too, and one typo would bury its own message under
/// a screenful of unsatisfied trait bounds (thiserror does the same).
fn with_fallback(error: syn::Error, fallback: proc_macro2::TokenStream) -> proc_macro2::TokenStream {
    let errors = error.into_compile_error();
    quote::quote! {
        #errors
        #fallback
    }
}
