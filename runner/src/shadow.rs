//! Shadow tables for rebuilds: statements rewritten to work on copies of a projection's tables.

use crate::lexer::{Token, tokens};

/// What a rebuild appends to the names of a projection and of its tables and indexes: it
/// builds the read model anew beside the live one, under these names.
pub const SHADOW_SUFFIX: &str = "__rebuild";

/// Rewrites `sql` to work on the shadow copies of `tables`: every identifier naming one of
/// them, and the name of every index the statement creates, gets [`SHADOW_SUFFIX`]. String
/// literals, comments and parameters are left alone.
pub fn shadow_sql(sql: &str, tables: &[String]) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    // The statement so far, upper-cased words and punctuation, to spot `CREATE ... INDEX name`.
    let mut statement: Vec<String> = Vec::new();
    for token in tokens(sql) {
        let (text, bare) = match token {
            Token::Word(word) => (word, word.to_ascii_lowercase()),
            Token::Quoted(quoted) => (quoted, quoted.trim_matches('"').to_owned()),
            Token::Parameter(name) => {
                out.push(':');
                out.push_str(name);
                statement.push(":".into());
                continue;
            }
            Token::Verbatim(text) => {
                out.push_str(text);
                let text = text.trim();
                if text == ";" {
                    statement.clear();
                } else if !text.is_empty() && !text.starts_with("--") && !text.starts_with("/*") {
                    statement.push(text.to_owned());
                }
                continue;
            }
        };
        let names_index = creates_index(&statement) && !["on", "if", "concurrently"].contains(&bare.as_str());
        if tables.contains(&bare) || names_index {
            match token {
                Token::Quoted(_) => out.push_str(&format!("\"{bare}{SHADOW_SUFFIX}\"")),
                _ => out.push_str(&format!("{bare}{SHADOW_SUFFIX}")),
            }
        } else {
            out.push_str(text);
        }
        statement.push(text.to_ascii_uppercase());
    }
    out
}

/// Whether the next identifier of `statement` names the index it creates:
/// `CREATE [UNIQUE] INDEX [CONCURRENTLY] [IF NOT EXISTS]` so far.
fn creates_index(statement: &[String]) -> bool {
    let mut words: Vec<&str> = statement.iter().map(String::as_str).collect();
    if words.ends_with(&["IF", "NOT", "EXISTS"]) {
        words.truncate(words.len() - 3);
    }
    if words.last() == Some(&"CONCURRENTLY") {
        words.pop();
    }
    matches!(words.as_slice(), ["CREATE", "INDEX"] | ["CREATE", "UNIQUE", "INDEX"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_statements_name_the_shadow_tables_and_indexes() {
        let tables = ["balances".to_owned(), "owners".to_owned()];
        let cases = [
            (
                "CREATE TABLE IF NOT EXISTS balances (id text PRIMARY KEY, owners int) -- balances",
                "CREATE TABLE IF NOT EXISTS balances__rebuild (id text PRIMARY KEY, owners__rebuild int) -- balances",
            ),
            (
                "CREATE UNIQUE INDEX IF NOT EXISTS by_owner ON Balances (owner); CREATE INDEX ON balances (id)",
                "CREATE UNIQUE INDEX IF NOT EXISTS by_owner__rebuild ON balances__rebuild (owner); \
                 CREATE INDEX ON balances__rebuild (id)",
            ),
            (
                "INSERT INTO \"balances\" VALUES (:stream_id, 'balances') ON CONFLICT (id) DO UPDATE \
                 SET n = balances.n + 1 FROM public.owners",
                "INSERT INTO \"balances__rebuild\" VALUES (:stream_id, 'balances') ON CONFLICT (id) DO UPDATE \
                 SET n = balances__rebuild.n + 1 FROM public.owners__rebuild",
            ),
            ("SELECT balances_total FROM totals", "SELECT balances_total FROM totals"),
        ];
        for (sql, expected) in cases {
            assert_eq!(shadow_sql(sql, &tables), expected);
        }
    }
}
