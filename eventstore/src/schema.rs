//! Whether a database's schema is up to date, found without writing: for processes that must
//! not migrate (read-only commands, roles without the right to create tables).

use sqlx::migrate::Migrator;

use crate::{Error, Result};

/// The versions of `migrator`'s migrations missing from `applied` (the versions the history
/// table records as successful), oldest first.
pub(crate) fn missing(migrator: &Migrator, applied: &[i64]) -> Vec<i64> {
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| m.version)
        .filter(|version| !applied.contains(version))
        .collect()
}

/// [`Error::NotMigrated`] if `applied` lacks any of `migrator`'s migrations.
pub(crate) fn require(migrator: &Migrator, applied: &[i64]) -> Result<()> {
    let missing = missing(migrator, applied);
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::NotMigrated { history: migrator.table_name.to_string(), missing })
}

/// The SQL that lists the successful migrations of `migrator`'s history table. The table name
/// is the one the crate set with `dangerous_set_table_name`, never user input.
pub(crate) fn applied_sql(migrator: &Migrator) -> String {
    format!("SELECT version FROM {} WHERE success ORDER BY version", migrator.table_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migrator() -> Migrator {
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.dangerous_set_table_name("annal_migrations");
        migrator
    }

    #[test]
    fn every_version_not_applied_is_named_oldest_first() {
        let migrator = migrator();
        let all: Vec<i64> = migrator.iter().map(|m| m.version).collect();
        assert!(all.len() >= 3, "{all:?}");
        let cases: [(&[i64], Vec<i64>); 4] = [
            (&[], all.clone()),
            (&all, vec![]),
            (&all[..1], all[1..].to_vec()),
            // A version this binary does not know (a newer binary migrated) is no reason to refuse.
            (&[all[0], all[1], all[2], 999_999], all[3..].to_vec()),
        ];
        for (applied, expected) in cases {
            assert_eq!(missing(&migrator, applied), expected, "applied {applied:?}");
        }
        let error = require(&migrator, &[]).unwrap_err().to_string();
        assert!(error.contains("annal_migrations") && error.contains(&all[0].to_string()), "{error}");
        assert!(require(&migrator, &all).is_ok());
    }
}
