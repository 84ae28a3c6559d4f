//! The delivery store URL (`postgres://…` or `sqlite://PATH`), which may carry credentials:
//! [`StoreUrl`] keeps the full text private and shows only a redacted form in `Display`,
//! `Debug` and errors.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// What stands in for a password in every rendering of a URL.
const REDACTED: &str = "***";

/// Which implementation a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Postgres,
    Sqlite,
}

/// A delivery store URL. Its `Display` and `Debug` show it with the password (in the user-info
/// part or a `password` query parameter) replaced by `***`; only the implementations read the
/// full text.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    kind: StoreKind,
    full: String,
    redacted: String,
}

/// Why a text is not a delivery store URL. Quotes the scheme at most, never the rest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidStoreUrl {
    /// Not `postgres://`, `postgresql://` or `sqlite://`.
    #[error(
        "unsupported delivery store URL scheme {0:?}: expected postgres://USER:PASSWORD@HOST:PORT/DATABASE or sqlite://PATH"
    )]
    Scheme(String),
    /// No `scheme://` at all.
    #[error(
        "a delivery store URL must start with postgres:// or sqlite:// (postgres://USER:PASSWORD@HOST:PORT/DATABASE or sqlite://PATH)"
    )]
    NoScheme,
    /// A `postgres://` URL that does not parse.
    #[error("invalid PostgreSQL delivery store URL: {0}")]
    Postgres(String),
    /// `sqlite://` with no path.
    #[error(
        "a sqlite:// delivery store URL needs a file path, e.g. sqlite:///var/lib/pushwire/deliveries.db"
    )]
    SqliteNoPath,
}

impl StoreUrl {
    /// Parses a delivery store URL.
    pub fn parse(text: &str) -> Result<Self, InvalidStoreUrl> {
        let (scheme, rest) = text.split_once("://").ok_or(InvalidStoreUrl::NoScheme)?;
        match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => {
                let mut url = ::url::Url::parse(text)
                    .map_err(|err| InvalidStoreUrl::Postgres(err.to_string()))?;
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(InvalidStoreUrl::Postgres("no host".into()));
                }
                if url.password().is_some() {
                    // Cannot fail: the URL has a host.
                    let _ = url.set_password(Some(REDACTED));
                }
                if url
                    .query_pairs()
                    .any(|(key, _)| key.eq_ignore_ascii_case("password"))
                {
                    let pairs: Vec<(String, String)> = url
                        .query_pairs()
                        .map(|(key, value)| {
                            let value = if key.eq_ignore_ascii_case("password") {
                                REDACTED.to_owned()
                            } else {
                                value.into_owned()
                            };
                            (key.into_owned(), value)
                        })
                        .collect();
                    url.query_pairs_mut().clear().extend_pairs(pairs);
                }
                Ok(Self {
                    kind: StoreKind::Postgres,
                    full: text.to_owned(),
                    redacted: url.to_string(),
                })
            }
            "sqlite" => {
                if rest.is_empty() {
                    return Err(InvalidStoreUrl::SqliteNoPath);
                }
                Ok(Self {
                    kind: StoreKind::Sqlite,
                    full: text.to_owned(),
                    redacted: text.to_owned(),
                })
            }
            _ => Err(InvalidStoreUrl::Scheme(truncate(scheme))),
        }
    }

    /// An embedded SQLite store in the file `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        let text = format!("sqlite://{}", path.into().display());
        Self {
            kind: StoreKind::Sqlite,
            full: text.clone(),
            redacted: text,
        }
    }

    /// Whether this is a PostgreSQL store.
    pub fn is_postgres(&self) -> bool {
        self.kind == StoreKind::Postgres
    }

    pub(crate) fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The full URL, credentials included: for the driver only.
    pub(crate) fn expose(&self) -> &str {
        &self.full
    }

    /// The SQLite file path (`sqlite://PATH`).
    pub(crate) fn sqlite_path(&self) -> Option<PathBuf> {
        (self.kind == StoreKind::Sqlite)
            .then(|| {
                self.full
                    .split_once("://")
                    .map(|(_, path)| PathBuf::from(path))
            })
            .flatten()
    }
}

impl FromStr for StoreUrl {
    type Err = InvalidStoreUrl;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreUrl").field(&self.redacted).finish()
    }
}

/// A scheme quoted in an error, cut short: a mistyped URL may hold a secret after all.
fn truncate(scheme: &str) -> String {
    scheme.chars().take(16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_password_is_redacted_everywhere() {
        let url = StoreUrl::parse(
            "postgres://pushwire:s3cr%2Ft@db.example:5432/deliveries?sslmode=require",
        )
        .unwrap();
        assert!(url.is_postgres());
        assert_eq!(
            url.to_string(),
            "postgres://pushwire:***@db.example:5432/deliveries?sslmode=require"
        );
        let debug = format!("{url:?}");
        assert!(!debug.contains("s3cr"), "{debug}");
        assert!(url.expose().contains("s3cr%2Ft"));
    }

    #[test]
    fn password_query_parameter_is_redacted() {
        let url =
            StoreUrl::parse("postgresql://db.example/deliveries?user=a&password=hunter2").unwrap();
        let shown = url.to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password=***"), "{shown}");
        assert!(!format!("{url:?}").contains("hunter2"));
    }

    #[test]
    fn sqlite_path_is_kept_verbatim() {
        let url = StoreUrl::parse("sqlite:///var/lib/pushwire/deliveries.db").unwrap();
        assert!(!url.is_postgres());
        assert_eq!(
            url.sqlite_path().unwrap(),
            PathBuf::from("/var/lib/pushwire/deliveries.db")
        );
        let relative = StoreUrl::parse("sqlite://data/deliveries.db").unwrap();
        assert_eq!(
            relative.sqlite_path().unwrap(),
            PathBuf::from("data/deliveries.db")
        );
        assert_eq!(
            StoreUrl::parse("sqlite://").unwrap_err(),
            InvalidStoreUrl::SqliteNoPath
        );
    }

    #[test]
    fn other_schemes_are_refused_without_quoting_the_rest() {
        let err = StoreUrl::parse("mysql://root:topsecret@db/x").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"mysql\""), "{text}");
        assert!(!text.contains("topsecret"), "{text}");
        let err = StoreUrl::parse("root:topsecret@db").unwrap_err();
        assert_eq!(err, InvalidStoreUrl::NoScheme);
        assert!(!err.to_string().contains("topsecret"));
    }

    #[test]
    fn a_malformed_postgres_url_is_refused_without_its_password() {
        let err = StoreUrl::parse("postgres://user:topsecret@/db").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
        let err = StoreUrl::parse("postgres://user:topsecret@host:notaport/db").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }
}
