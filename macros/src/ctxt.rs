//! Error collection: report every mistake in one compile, not one per fix.

use std::cell::RefCell;

use quote::ToTokens;

/// Collects errors while parsing and validating; `check` turns them into one `syn::Error`.
#[derive(Default)]
pub(crate) struct Ctxt {
    errors: RefCell<Vec<syn::Error>>,
}

impl Ctxt {
    pub(crate) fn error_spanned(&self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.errors.borrow_mut().push(syn::Error::new_spanned(tokens, message));
    }

    pub(crate) fn push(&self, error: syn::Error) {
        self.errors.borrow_mut().push(error);
    }

    pub(crate) fn check(self) -> syn::Result<()> {
        let mut errors = self.errors.into_inner().into_iter();
        let Some(mut combined) = errors.next() else { return Ok(()) };
        for error in errors {
            combined.combine(error);
        }
        Err(combined)
    }
}

/// Skips the value of an attribute key we reject, so parsing can go on and report more.
pub(crate) fn skip_value(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        meta.value()?.parse::<syn::Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        content.parse::<proc_macro2::TokenStream>()?;
    }
    Ok(())
}

/// Keeps the first value of a key and reports any repeat.
pub(crate) struct Once<T> {
    name: &'static str,
    value: Option<T>,
}

impl<T> Once<T> {
    pub(crate) fn new(name: &'static str) -> Self {
        Once { name, value: None }
    }

    pub(crate) fn set(&mut self, cx: &Ctxt, span: impl ToTokens, value: T) {
        if self.value.is_some() {
            cx.error_spanned(span, format!("duplicate `{}`; give it once", self.name));
        } else {
            self.value = Some(value);
        }
    }

    pub(crate) fn get(self) -> Option<T> {
        self.value
    }
}

/// The rules the event store applies to event type names, checked at compile time.
pub(crate) fn event_type_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("an event name cannot be empty")
    } else if name.len() > 255 {
        Some("an event name is at most 255 bytes")
    } else if name.chars().any(char::is_control) {
        Some("an event name cannot contain control characters")
    } else {
        None
    }
}

/// Parses a schema version: an integer literal from 1.
pub(crate) fn parse_version(
    cx: &Ctxt,
    meta: &syn::meta::ParseNestedMeta<'_>,
) -> syn::Result<Option<(u32, syn::LitInt)>> {
    let expr: syn::Expr = meta.value()?.parse()?;
    if let syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Int(lit), .. }) = &expr
        && lit.suffix().is_empty()
        && let Ok(version @ 1..) = lit.base10_parse::<u32>()
    {
        return Ok(Some((version, lit.clone())));
    }
    cx.error_spanned(&expr, "a schema version is an integer literal from 1, such as `version = 2`");
    Ok(None)
}
