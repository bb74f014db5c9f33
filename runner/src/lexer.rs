//! A lexer for SQL text, just enough to find named parameters and table names: nothing inside
//! string literals, quoted identifiers, comments or dollar-quoted bodies is taken for either.

/// A piece of SQL text, as far as named parameters and table names are concerned.
#[derive(Debug, PartialEq)]
pub(crate) enum Token<'a> {
    /// Copied as it is: string literals, comments, numbers, operators, white space.
    Verbatim(&'a str),
    /// A bare word: a keyword or an identifier.
    Word(&'a str),
    /// A double-quoted identifier, quotes included.
    Quoted(&'a str),
    /// A named parameter, `:name`, without its colon.
    Parameter(&'a str),
}

/// Splits SQL into [`Token`]s, so that nothing inside string literals, quoted identifiers,
/// comments or dollar-quoted bodies is taken for a parameter or a table name.
pub(crate) fn tokens(sql: &str) -> Vec<Token<'_>> {
    let b = sql.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let find = |from: usize, needle: &str| sql[from..].find(needle).map_or(sql.len(), |p| from + p + needle.len());
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let next = b.get(i + 1).copied();
        let token = match b[i] {
            b'\'' => {
                i = find(i + 1, "'");
                Token::Verbatim(&sql[start..i])
            }
            b'"' => {
                i = find(i + 1, "\"");
                Token::Quoted(&sql[start..i])
            }
            b'-' if next == Some(b'-') => {
                i = sql[i..].find('\n').map_or(sql.len(), |p| i + p);
                Token::Verbatim(&sql[start..i])
            }
            b'/' if next == Some(b'*') => {
                i = find(i + 2, "*/");
                Token::Verbatim(&sql[start..i])
            }
            b'$' if next.is_some_and(|c| !c.is_ascii_digit()) && dollar_tag(&sql[i..]).is_some() => {
                let tag = dollar_tag(&sql[i..]).unwrap_or("$$");
                i = find(i + tag.len(), tag);
                Token::Verbatim(&sql[start..i])
            }
            b':' if next == Some(b':') => {
                i += 2;
                Token::Verbatim(&sql[start..i])
            }
            b':' if next.is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                Token::Parameter(&sql[start + 1..i])
            }
            c if word(c) => {
                while i < b.len() && word(b[i]) {
                    i += 1;
                }
                if c.is_ascii_digit() { Token::Verbatim(&sql[start..i]) } else { Token::Word(&sql[start..i]) }
            }
            _ => {
                i += 1;
                Token::Verbatim(&sql[start..i])
            }
        };
        out.push(token);
    }
    out
}

/// The opening tag of a PostgreSQL dollar-quoted string (`$$` or `$name$`) at the start of `sql`.
fn dollar_tag(sql: &str) -> Option<&str> {
    let end = sql[1..].find('$')? + 2;
    let tag = &sql[..end];
    tag[1..end - 1].bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_').then_some(tag)
}
