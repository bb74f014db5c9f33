//! `#[derive(Event)]`: parse, validate, expand.

use std::collections::HashMap;

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{Data, DeriveInput, Fields, Ident, LitStr, Path};

use crate::ctxt::{Ctxt, Once, event_type_problem, parse_version, skip_value};

struct Upcaster {
    from: u32,
    with: Path,
}

struct Variant {
    ident: Ident,
    name: String,
    version: u32,
    unit: bool,
    upcasters: Vec<Upcaster>,
}

pub(crate) fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let cx = Ctxt::default();
    let Data::Enum(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "#[derive(Event)] needs an enum with one variant per event type, such as \
             `enum AccountEvent { Opened { owner: String }, Deposited { amount: u64 } }`",
        ));
    };
    if !input.generics.params.is_empty() {
        cx.error_spanned(
            &input.generics,
            "#[derive(Event)] does not support generic enums; use concrete payload types",
        );
    }
    if data.variants.is_empty() {
        cx.error_spanned(&input.ident, "an event enum needs at least one variant, one per event type");
    }
    reject_serde_renames(&cx, &input.attrs, true);

    // Enum-level defaults.
    let mut default_version = Once::new("version");
    let mut prefix = Once::new("prefix");
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("event")) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("version") {
                if let Some((v, lit)) = parse_version(&cx, &meta)? {
                    default_version.set(&cx, &lit, v);
                }
            } else if meta.path.is_ident("prefix") {
                let lit: LitStr = meta.value()?.parse()?;
                prefix.set(&cx, &lit, lit.value());
            } else if meta.path.is_ident("name") {
                cx.error_spanned(
                    &meta.path,
                    "`name` belongs on a variant (`#[event(name = \"...\")]`); on the enum, \
                     `prefix = \"...\"` prefixes every variant's name",
                );
                skip_value(&meta)?;
            } else {
                cx.error_spanned(
                    &meta.path,
                    "unknown key in #[event(...)] on the enum; expected `version` or `prefix`",
                );
                skip_value(&meta)?;
            }
            Ok(())
        });
        if let Err(e) = parsed {
            cx.push(e);
        }
    }
    let default_version = default_version.get().unwrap_or(1);
    let prefix = prefix.get().unwrap_or_default();

    let mut variants = Vec::new();
    let mut names: HashMap<String, Ident> = HashMap::new();
    for variant in &data.variants {
        reject_serde_renames(&cx, &variant.attrs, false);
        let mut name = Once::new("name");
        let mut version = Once::new("version");
        let mut upcasters: Vec<Upcaster> = Vec::new();
        for attr in variant.attrs.iter().filter(|a| a.path().is_ident("event")) {
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("name") {
                    let lit: LitStr = meta.value()?.parse()?;
                    match event_type_problem(&lit.value()) {
                        Some(problem) => cx.error_spanned(&lit, problem),
                        None => name.set(&cx, &lit, (lit.value(), lit.clone())),
                    }
                } else if meta.path.is_ident("version") {
                    if let Some((v, lit)) = parse_version(&cx, &meta)? {
                        version.set(&cx, lit.clone(), (v, lit));
                    }
                } else if meta.path.is_ident("upcast") {
                    let upcast_path = meta.path.clone();
                    let mut from = Once::new("from");
                    let mut with = Once::new("with");
                    meta.parse_nested_meta(|inner| {
                        if inner.path.is_ident("from") {
                            if let Some((v, lit)) = parse_version(&cx, &inner)? {
                                from.set(&cx, lit.clone(), (v, lit));
                            }
                        } else if inner.path.is_ident("with") {
                            let path: Path = inner.value()?.parse()?;
                            with.set(&cx, &path, path.clone());
                        } else {
                            cx.error_spanned(&inner.path, "unknown key in `upcast(...)`; expected `from` and `with`");
                            skip_value(&inner)?;
                        }
                        Ok(())
                    })?;
                    match (from.get(), with.get()) {
                        (Some((from, lit)), Some(with)) => {
                            if upcasters.iter().any(|u| u.from == from) {
                                cx.error_spanned(
                                    &lit,
                                    format!("a second upcaster from version {from}; give one per version"),
                                );
                            } else {
                                upcasters.push(Upcaster { from, with });
                            }
                        }
                        (None, _) => cx.error_spanned(
                            &upcast_path,
                            "`upcast` needs the version it reads: `upcast(from = 1, with = path::to::function)`",
                        ),
                        (_, None) => cx.error_spanned(
                            &upcast_path,
                            "`upcast` needs the function that converts: `upcast(from = 1, with = path::to::function)`",
                        ),
                    }
                } else {
                    cx.error_spanned(
                        &meta.path,
                        "unknown key in #[event(...)] on a variant; expected `name`, `version` or `upcast`",
                    );
                    skip_value(&meta)?;
                }
                Ok(())
            });
            if let Err(e) = parsed {
                cx.push(e);
            }
        }
        let (name, name_span): (String, Option<LitStr>) = match name.get() {
            Some((n, lit)) => (n, Some(lit)),
            None => (variant.ident.to_string(), None),
        };
        let name = format!("{prefix}{name}");
        if let Some(problem) = event_type_problem(&name) {
            cx.error_spanned(&variant.ident, problem);
        }
        let (version, version_lit) = match version.get() {
            Some((v, lit)) => (v, Some(lit)),
            None => (default_version, None),
        };
        for upcaster in &upcasters {
            if upcaster.from >= version {
                let span: &dyn quote::ToTokens = match &version_lit {
                    Some(lit) => lit,
                    None => &upcaster.with,
                };
                cx.error_spanned(
                    span,
                    format!(
                        "variant `{}` is at schema version {version}, so an upcaster must read an older one \
                         (from 1 to {}); raise `version` when the payload changes",
                        variant.ident,
                        version.saturating_sub(1)
                    ),
                );
            }
        }
        match names.get(&name) {
            Some(other) => {
                let span: &dyn quote::ToTokens = match &name_span {
                    Some(lit) => lit,
                    None => &variant.ident,
                };
                cx.error_spanned(
                    span,
                    format!("the event name \"{name}\" is already used by variant `{other}`; names must be unique"),
                );
            }
            None => {
                names.insert(name.clone(), variant.ident.clone());
            }
        }
        variants.push(Variant {
            ident: variant.ident.clone(),
            name,
            version,
            unit: matches!(variant.fields, Fields::Unit),
            upcasters,
        });
    }
    cx.check()?;
    Ok(expand(&input.ident, &variants))
}

/// An implementation for a type whose attributes are wrong, so that its uses still compile and
/// only the real errors are reported. None for generic types: their uses fail for another
/// reason anyway.
pub(crate) fn fallback(input: &DeriveInput) -> TokenStream {
    if !input.generics.params.is_empty() {
        return TokenStream::new();
    }
    let ident = &input.ident;
    quote! {
        const _: () = {
            #[automatically_derived]
            impl ::annal::Event for #ident {
                const EVENT_TYPES: &'static [&'static str] = &[];

                fn event_type(&self) -> &'static str {
                    ::core::unreachable!()
                }

                fn schema_version(&self) -> u32 {
                    ::core::unreachable!()
                }

                fn to_data(&self) -> ::annal::Result<::annal::__private::Value> {
                    ::core::unreachable!()
                }

                fn from_stored(_: &str, _: u32, _: ::annal::__private::Value) -> ::annal::Result<Self> {
                    ::core::unreachable!()
                }
            }
        };
    }
}

/// Serde attributes that change the enum's tags would break the stored-name mapping.
fn reject_serde_renames(cx: &Ctxt, attrs: &[syn::Attribute], on_enum: bool) {
    let forbidden: &[&str] =
        if on_enum { &["tag", "content", "untagged", "rename_all"] } else { &["rename", "alias", "other", "untagged"] };
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            if let Some(key) = forbidden.iter().find(|k| meta.path.is_ident(k)) {
                cx.error_spanned(
                    &meta.path,
                    format!(
                        "#[serde({key})] changes how variants are tagged, which #[derive(Event)] relies on; \
                         name event types with #[event(name = \"...\")] instead"
                    ),
                );
            }
            skip_value(&meta)
        });
    }
}

fn expand(ident: &Ident, variants: &[Variant]) -> TokenStream {
    let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    let idents: Vec<&Ident> = variants.iter().map(|v| &v.ident).collect();
    let versions: Vec<u32> = variants.iter().map(|v| v.version).collect();
    let decode_arms = variants.iter().map(|v| {
        let Variant { ident: variant, name, version, unit, upcasters } = v;
        let variant_name = variant.to_string();
        let steps = upcasters.iter().map(|u| {
            let (from, with) = (u.from, &u.with);
            let step = format_ident!("__step_{}", from);
            quote! { #from => { let #step = #with; ::annal::__private::upcasted(event_type, schema_version, #step(data))? } }
        });
        let upcast = if upcasters.is_empty() {
            quote! {
                if schema_version < #version {
                    return ::core::result::Result::Err(
                        ::annal::__private::no_upcaster(event_type, schema_version, schema_version, #version),
                    );
                }
            }
        } else {
            quote! {
                let mut version = schema_version;
                while version < #version {
                    data = match version {
                        #(#steps)*
                        _ => return ::core::result::Result::Err(
                            ::annal::__private::no_upcaster(event_type, schema_version, version, #version),
                        ),
                    };
                    version += 1;
                }
            }
        };
        quote! {
            #name => {
                #[allow(unused_mut)]
                let mut data = data;
                #upcast
                if schema_version > #version {
                    return ::core::result::Result::Err(::annal::__private::too_new(event_type, schema_version, #version));
                }
                ::annal::__private::decode_variant::<Self>(event_type, schema_version, #variant_name, #unit, data)
            }
        }
    });
    quote! {
        const _: () = {
            #[automatically_derived]
            impl ::annal::Event for #ident {
                const EVENT_TYPES: &'static [&'static str] = &[#(#names),*];

                fn event_type(&self) -> &'static str {
                    match self {
                        #(Self::#idents { .. } => #names,)*
                    }
                }

                fn schema_version(&self) -> u32 {
                    match self {
                        #(Self::#idents { .. } => #versions,)*
                    }
                }

                fn to_data(&self) -> ::annal::Result<::annal::__private::Value> {
                    ::annal::__private::encode_variant(self)
                }

                fn from_stored(
                    event_type: &str,
                    schema_version: u32,
                    data: ::annal::__private::Value,
                ) -> ::annal::Result<Self> {
                    match event_type {
                        #(#decode_arms)*
                        _ => ::core::result::Result::Err(::annal::__private::unknown_event_type(
                            event_type,
                            schema_version,
                            <Self as ::annal::Event>::EVENT_TYPES,
                        )),
                    }
                }
            }
        };
    }
}
