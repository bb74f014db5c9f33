//! `#[derive(Aggregate)]`: parse, validate, expand.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, LitStr, Type};

use crate::ctxt::{Ctxt, Once, parse_version, skip_value};

struct Snapshots {
    every: u64,
    version: u32,
}

pub(crate) fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let cx = Ctxt::default();
    if !matches!(input.data, Data::Struct(_)) {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "#[derive(Aggregate)] needs a struct holding the aggregate's state; events go in an enum with #[derive(Event)]",
        ));
    }
    if !input.generics.params.is_empty() {
        cx.error_spanned(&input.generics, "#[derive(Aggregate)] does not support generic structs");
    }
    let mut category = Once::new("category");
    let mut event = Once::new("event");
    let mut id = Once::new("id");
    let mut snapshot = Once::new("snapshot");
    let mut seen_attribute = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("aggregate")) {
        seen_attribute = true;
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("category") {
                let lit: LitStr = meta.value()?.parse()?;
                let value = lit.value();
                if value.is_empty() || value.contains('-') || value.chars().any(char::is_control) {
                    cx.error_spanned(
                        &lit,
                        "a category is non-empty, without `-` or control characters: it is the part of \
                         the stream name before the first `-`",
                    );
                } else {
                    category.set(&cx, &lit, value);
                }
            } else if meta.path.is_ident("event") {
                let ty: Type = meta.value()?.parse()?;
                event.set(&cx, &ty, ty.clone());
            } else if meta.path.is_ident("id") {
                let ty: Type = meta.value()?.parse()?;
                id.set(&cx, &ty, ty.clone());
            } else if meta.path.is_ident("snapshot") {
                let snapshot_path = meta.path.clone();
                let mut every = Once::new("every");
                let mut version = Once::new("version");
                meta.parse_nested_meta(|inner| {
                    if inner.path.is_ident("every") {
                        let lit: syn::LitInt = inner.value()?.parse()?;
                        match lit.base10_parse::<u64>() {
                            Ok(n @ 1..) if lit.suffix().is_empty() => every.set(&cx, &lit, n),
                            _ => cx.error_spanned(&lit, "`every` is a number of events from 1, such as `every = 100`"),
                        }
                    } else if inner.path.is_ident("version") {
                        if let Some((v, lit)) = parse_version(&cx, &inner)? {
                            version.set(&cx, &lit, v);
                        }
                    } else {
                        cx.error_spanned(&inner.path, "unknown key in `snapshot(...)`; expected `every` and `version`");
                        skip_value(&inner)?;
                    }
                    Ok(())
                })?;
                match every.get() {
                    Some(every) => {
                        snapshot.set(&cx, &snapshot_path, Snapshots { every, version: version.get().unwrap_or(1) })
                    }
                    None => cx.error_spanned(&snapshot_path, "`snapshot` needs `every = N`: `snapshot(every = 100)`"),
                }
            } else {
                cx.error_spanned(
                    &meta.path,
                    "unknown key in #[aggregate(...)]; expected `category`, `event`, `id` or `snapshot`",
                );
                skip_value(&meta)?;
            }
            Ok(())
        });
        if let Err(e) = parsed {
            cx.push(e);
        }
    }
    let event = event.get();
    if event.is_none() {
        let hint = if seen_attribute { "" } else { "add #[aggregate(event = YourEvent)]: " };
        cx.error_spanned(
            &input.ident,
            format!(
                "{hint}#[derive(Aggregate)] needs the aggregate's event type: `#[aggregate(event = AccountEvent)]`"
            ),
        );
    }
    cx.check()?;
    let ident = &input.ident;
    let category = category.get().unwrap_or_else(|| ident.to_string().to_lowercase());
    let event = event.expect("checked above");
    let id = id.get().map_or_else(|| quote!(str), |ty| quote!(#ty));
    let snapshots = snapshot.get().map(|Snapshots { every, version }| {
        quote! {
            fn snapshot_policy() -> ::annal::SnapshotPolicy {
                ::annal::SnapshotPolicy::every(#every).with_schema_version(#version)
            }

            fn to_snapshot(&self) -> ::annal::Result<::annal::__private::Value> {
                ::annal::__private::to_snapshot(self)
            }

            fn from_snapshot(snapshot: ::annal::__private::Value) -> ::annal::Result<Self> {
                ::annal::__private::from_snapshot(#category, #version, snapshot)
            }
        }
    });
    Ok(quote! {
        const _: () = {
            #[automatically_derived]
            impl ::annal::Aggregate for #ident {
                const CATEGORY: &'static str = #category;
                type Id = #id;
                type Event = #event;
                #snapshots
            }
        };
    })
}

/// An implementation for a struct whose attributes are wrong, so that its uses (`impl Decide`,
/// repositories) still compile and only the real errors are reported. It needs the event type:
/// without one (or for a generic struct) there is no fallback.
pub(crate) fn fallback(input: &DeriveInput) -> TokenStream {
    if !input.generics.params.is_empty() {
        return TokenStream::new();
    }
    let (mut event, mut id) = (None::<Type>, None::<Type>);
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("aggregate")) {
        // Whatever does not parse was reported by `derive`; take what does.
        let _ = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("event") {
                event = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("id") {
                id = Some(meta.value()?.parse()?);
            } else {
                skip_value(&meta)?;
            }
            Ok(())
        });
    }
    let Some(event) = event else { return TokenStream::new() };
    let ident = &input.ident;
    let id = id.map_or_else(|| quote!(str), |ty| quote!(#ty));
    let category = ident.to_string().to_lowercase();
    quote! {
        const _: () = {
            #[automatically_derived]
            impl ::annal::Aggregate for #ident {
                const CATEGORY: &'static str = #category;
                type Id = #id;
                type Event = #event;
            }
        };
    }
}
