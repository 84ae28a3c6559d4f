//! Schema migrations, compiled into the binary: one SQL file per version and database under
//! `migrations/{postgres,sqlite}/`, applied in order inside one transaction that also records
//! them in `pushwire_schema_migrations`. The implementations serialise concurrent runs (a
//! PostgreSQL advisory lock; SQLite's write lock) so several processes may start at once.
//! Migrations are only ever added, never edited once released.

/// One schema version.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Applied in increasing order; recorded once applied.
    pub version: i64,
    /// A short name, recorded with the version.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
}

/// Records applied versions; created by every run before anything else.
pub(super) const VERSIONS_TABLE_SQL: &str =
    "CREATE TABLE IF NOT EXISTS pushwire_schema_migrations (
    version    BIGINT PRIMARY KEY,
    name       TEXT   NOT NULL,
    applied_ms BIGINT NOT NULL
)";

/// PostgreSQL's migrations.
pub(super) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "deliveries",
        sql: include_str!("migrations/postgres/0001_deliveries.sql"),
    },
    Migration {
        version: 2,
        name: "account_stats_index",
        sql: include_str!("migrations/postgres/0002_account_stats_index.sql"),
    },
];

/// SQLite's migrations (the same versions, in SQLite's dialect).
pub(super) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "deliveries",
        sql: include_str!("migrations/sqlite/0001_deliveries.sql"),
    },
    Migration {
        version: 2,
        name: "account_stats_index",
        sql: include_str!("migrations/sqlite/0002_account_stats_index.sql"),
    },
];

/// The migrations of `all` not yet in `applied`, in order; logs when the schema is newer than
/// this binary (a newer release migrated it; migrations are additive, so this one still runs).
pub(super) fn pending(all: &'static [Migration], applied: &[i64]) -> Vec<&'static Migration> {
    let known = all.last().map_or(0, |m| m.version);
    if let Some(newest) = applied.iter().copied().max().filter(|v| *v > known) {
        tracing::warn!(
            schema_version = newest,
            binary_version = known,
            "the delivery store schema is newer than this binary"
        );
    }
    all.iter()
        .filter(|m| !applied.contains(&m.version))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_both_databases_have_the_same() {
        for list in [POSTGRES, SQLITE] {
            assert!(list.windows(2).all(|w| w[0].version < w[1].version));
        }
        let versions = |list: &[Migration]| list.iter().map(|m| m.version).collect::<Vec<_>>();
        assert_eq!(versions(POSTGRES), versions(SQLITE));
    }

    #[test]
    fn pending_skips_applied_versions() {
        assert_eq!(pending(POSTGRES, &[]).len(), POSTGRES.len());
        assert_eq!(pending(POSTGRES, &[1]).len(), POSTGRES.len() - 1);
        assert!(pending(POSTGRES, &[1, 2]).is_empty());
        assert!(pending(POSTGRES, &[1, 2, 99]).is_empty());
    }
}
