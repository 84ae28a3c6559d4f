//! The configuration's rules: validation, invariants and the transactions that keep them
//! (unique ids and display names, scopes only for existing integrations of the same account,
//! etag checks, atomic forced deletes), bulk imports of an account (`import.rs`, by the same
//! rules as the creates), and `TestIntegration`'s test request. Knows the
//! [`Store`] contract and the domain types, never gRPC: the `api` module turns requests into
//! calls here and errors into statuses.

pub mod deliveries;
mod delivery_filter;
pub mod feed;
mod import;
mod integrations;
mod push_scopes;
mod test_integration;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use pushwire_common::domain::convert::InvalidField;
use pushwire_common::domain::{AccountName, Integration, PushScope};
use pushwire_common::webhook::ssrf::AllowList;
use rand::Rng as _;

pub use feed::{Change, ConfigFeed, FeedUpdate, FeedView};
pub use import::{Imported, MAX_IMPORT_OBJECTS};
pub use integrations::{AuthHeaderInput, IntegrationPatch};
pub use push_scopes::PushScopePatch;
pub use test_integration::{TestAnswer, TestReport};

use crate::crypto::Keyring;
use crate::store::records::{self, Record};
use crate::store::{Store, StoreError, Txn, TxnOutcome, keys};

/// How often a mutation is retried when a concurrent change in the same account made its
/// transaction's guards fail; each retry re-reads and re-validates.
const MAX_ATTEMPTS: usize = 8;
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 1000;

/// Why a call was refused. `api` maps each variant to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad input; names the field.
    #[error(transparent)]
    InvalidArgument(#[from] InvalidField),
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The id or a unique property is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// A stale etag, or too much contention.
    #[error("{0}")]
    Aborted(String),
    /// The request conflicts with the state (e.g. a scope for a missing integration).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A per-account limit is reached (e.g. `--max-integrations-per-account`).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result of the service layer.
pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// Default of `--max-integrations-per-account`.
pub const DEFAULT_MAX_INTEGRATIONS_PER_ACCOUNT: usize = 100;
/// Default of `--max-push-scopes-per-account`.
pub const DEFAULT_MAX_PUSH_SCOPES_PER_ACCOUNT: usize = 1000;

/// Settings of the [`Catalog`].
#[derive(Clone, Debug)]
pub struct CatalogOptions {
    /// Accept `http://` integration URLs (development and tests only).
    pub allow_insecure_http: bool,
    /// How long a replaced signing secret keeps signing beside the new one.
    pub secret_rotation_grace: Duration,
    /// The SSRF allow-list (`--allow-cidr`): URLs whose host is a literal non-public address,
    /// or a `localhost` name, are refused at create and update unless it allows them.
    pub ssrf_allow: AllowList,
    /// Most integrations one account may have.
    pub max_integrations_per_account: usize,
    /// Most push scopes one account may have.
    pub max_push_scopes_per_account: usize,
}

impl Default for CatalogOptions {
    fn default() -> Self {
        Self {
            allow_insecure_http: false,
            secret_rotation_grace: Duration::from_secs(24 * 3600),
            ssrf_allow: AllowList::default(),
            max_integrations_per_account: DEFAULT_MAX_INTEGRATIONS_PER_ACCOUNT,
            max_push_scopes_per_account: DEFAULT_MAX_PUSH_SCOPES_PER_ACCOUNT,
        }
    }
}

/// Integrations and push scopes, validated and stored.
#[derive(Clone)]
pub struct Catalog {
    store: Arc<dyn Store>,
    /// Answers reads while the store is unavailable (a lost etcd quorum).
    memory: Option<ConfigFeed>,
    /// Encrypt and decrypt the secrets in records.
    keys: Arc<Keyring>,
    opts: CatalogOptions,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// A read's answer, and where it came from.
#[derive(Debug)]
pub struct Read<T> {
    /// The answer.
    pub value: T,
    /// `Some(revision)` when the store was unavailable and the answer comes from the control
    /// plane's in-memory copy of the configuration at `revision`, which may be behind.
    pub stale_at: Option<i64>,
}

/// The feed's in-memory copy of the configuration, records by store key.
struct Memory<'a> {
    integrations: &'a BTreeMap<String, Arc<Integration>>,
    push_scopes: &'a BTreeMap<String, Arc<PushScope>>,
}

impl Memory<'_> {
    fn under<'m, T>(
        map: &'m BTreeMap<String, Arc<T>>,
        prefix: &'m str,
    ) -> impl Iterator<Item = &'m T> + 'm {
        map.range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(move |(key, _)| key.starts_with(prefix))
        .map(|(_, v)| v.as_ref())
    }
}

/// A kind of stored resource, as the reads find it in a [`Record`] and in [`Memory`].
trait Stored: Clone + Sized {
    /// The resource in `record`, if it is one of these.
    fn of(record: Record) -> Option<Self>;
    /// These resources in `memory`, by store key.
    fn in_memory<'m>(memory: &Memory<'m>) -> &'m BTreeMap<String, Arc<Self>>;
}

impl Stored for Integration {
    fn of(record: Record) -> Option<Self> {
        match record {
            Record::Integration(i) => Some(i),
            Record::PushScope(_) => None,
        }
    }

    fn in_memory<'m>(memory: &Memory<'m>) -> &'m BTreeMap<String, Arc<Self>> {
        memory.integrations
    }
}

impl Stored for PushScope {
    fn of(record: Record) -> Option<Self> {
        match record {
            Record::PushScope(s) => Some(s),
            Record::Integration(_) => None,
        }
    }

    fn in_memory<'m>(memory: &Memory<'m>) -> &'m BTreeMap<String, Arc<Self>> {
        memory.push_scopes
    }
}

/// One account's configuration read at one store revision.
#[derive(Debug)]
struct AccountView {
    revision: i64,
    integrations: BTreeMap<String, Integration>,
    scopes: BTreeMap<String, PushScope>,
}

/// A page request: size and the token of the previous page.
#[derive(Clone, Debug, Default)]
pub struct PageRequest {
    /// Requested size; 0 means the default.
    pub size: i32,
    /// `next_page_token` of the previous page.
    pub token: String,
}

/// A page of results.
#[derive(Clone, Debug)]
pub struct Page<T> {
    /// The items, ordered by id.
    pub items: Vec<T>,
    /// Token of the next page; empty on the last one.
    pub next_token: String,
}

impl Catalog {
    /// A catalog over `store`, its records' secrets encrypted with `keys`.
    pub fn new(store: Arc<dyn Store>, keys: Arc<Keyring>, opts: CatalogOptions) -> Self {
        Self {
            store,
            memory: None,
            keys,
            opts,
        }
    }

    /// The same, answering reads from `feed`'s in-memory copy of the configuration while the
    /// store is unavailable, marked [`Read::stale_at`] (as the Kubernetes API server's watch
    /// cache serves reads). Writes still need the store.
    pub fn with_memory(mut self, feed: ConfigFeed) -> Self {
        self.memory = Some(feed);
        self
    }

    /// The resource stored at `key` (`name` for NOT_FOUND), from the store only.
    async fn stored<T: Stored>(
        &self,
        key: &str,
        name: &(dyn std::fmt::Display + Sync),
    ) -> Result<T> {
        let kv = self.store.get(key).await?;
        let record = kv.map(|kv| records::decode(&kv, &self.keys)).transpose()?;
        record
            .flatten()
            .and_then(T::of)
            .ok_or_else(|| ServiceError::NotFound(name.to_string()))
    }

    /// The resource at `key`, from memory while the store is unavailable.
    async fn read_one<T: Stored>(
        &self,
        key: &str,
        name: &(dyn std::fmt::Display + Sync),
    ) -> Result<Read<T>> {
        self.read(self.stored(key, name), |memory| {
            T::in_memory(memory)
                .get(key)
                .map(|r| T::clone(r))
                .ok_or_else(|| ServiceError::NotFound(name.to_string()))
        })
        .await
    }

    /// Every resource of kind `T` under `prefix`, in key order, from memory while the store is
    /// unavailable.
    async fn read_under<T: Stored>(&self, prefix: &str) -> Result<Read<Vec<T>>> {
        let from_store = async {
            let range = self.store.range(prefix).await?;
            let mut items = Vec::with_capacity(range.kvs.len());
            for kv in &range.kvs {
                if let Some(item) = records::decode(kv, &self.keys)?.and_then(T::of) {
                    items.push(item);
                }
            }
            Ok(items)
        };
        self.read(from_store, |memory| {
            Ok(Memory::under(T::in_memory(memory), prefix)
                .cloned()
                .collect())
        })
        .await
    }

    /// `from_store`'s answer or, when the store is unavailable, `from_memory` over the feed's
    /// copy (records by store key).
    async fn read<T>(
        &self,
        from_store: impl Future<Output = Result<T>>,
        from_memory: impl FnOnce(&Memory<'_>) -> Result<T>,
    ) -> Result<Read<T>> {
        let error = match from_store.await {
            Ok(value) => {
                return Ok(Read {
                    value,
                    stale_at: None,
                });
            }
            Err(e @ ServiceError::Store(StoreError::Unavailable(_))) => e,
            Err(e) => return Err(e),
        };
        let cached = self.memory.as_ref().and_then(|feed| {
            feed.read_cached(|integrations, push_scopes| {
                from_memory(&Memory {
                    integrations,
                    push_scopes,
                })
            })
        });
        match cached {
            Some((revision, value)) => Ok(Read {
                value: value?,
                stale_at: Some(revision),
            }),
            None => Err(error),
        }
    }

    /// The store behind the catalog.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    async fn view(&self, account: &AccountName) -> Result<AccountView> {
        let range = self
            .store
            .range(&keys::account_prefix(account.id()))
            .await?;
        let mut view = AccountView {
            revision: range.revision,
            integrations: BTreeMap::new(),
            scopes: BTreeMap::new(),
        };
        for kv in &range.kvs {
            match records::decode(kv, &self.keys)? {
                Some(Record::Integration(i)) => {
                    view.integrations.insert(i.name.id().to_owned(), i);
                }
                Some(Record::PushScope(s)) => {
                    view.scopes.insert(s.name.id().to_owned(), s);
                }
                None => {}
            }
        }
        Ok(view)
    }
}

/// Checks a client's etag against the current revision.
fn check_etag(name: &dyn std::fmt::Display, etag: Option<i64>, current: i64) -> Result<()> {
    match etag {
        Some(e) if e != current => Err(ServiceError::Aborted(format!(
            "{name} was changed since etag {e} (current etag {current}); read it again and retry"
        ))),
        _ => Ok(()),
    }
}

fn too_busy() -> ServiceError {
    ServiceError::Aborted("too many concurrent changes in this account; retry".into())
}

/// What one try of an optimistic transaction ([`Catalog::transact`]) decided.
enum Attempt<T> {
    /// Commit `txn`, whose guards hold only if nothing it read has changed since; `value` is
    /// what the call returns once it commits.
    Commit {
        /// The guarded transaction.
        txn: Txn,
        /// The result, without its new revision.
        value: T,
    },
    /// Read and check again (e.g. a generated id is taken); counts as a try.
    Again,
}

impl Catalog {
    /// Runs an optimistic transaction: reads with `read`, then `attempt` checks the rules on
    /// what was read and returns the guarded transaction to commit. When a guard fails because
    /// of a concurrent change in the account, it reads and checks again, [`MAX_ATTEMPTS`] times
    /// at most (then ABORTED). A rule `attempt` refuses ends the call. Returns the value and
    /// the revision committed at.
    async fn transact<V, T, R>(
        &self,
        read: impl Fn() -> R,
        mut attempt: impl FnMut(V) -> Result<Attempt<T>>,
    ) -> Result<(T, i64)>
    where
        R: Future<Output = Result<V>>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let Attempt::Commit { txn, value } = attempt(read().await?)? else {
                continue;
            };
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                return Ok((value, revision));
            }
        }
        Err(too_busy())
    }
}

/// A random id for resources created without one: a letter then 11 letters or digits.
fn generate_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(12);
    id.push(char::from(ALPHABET[rng.random_range(0..26)]));
    id.extend((0..11).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])));
    id
}

/// Pages through items ordered by id; the token is the last id of the previous page.
fn paginate<T: Clone>(
    items: impl Iterator<Item = (String, T)>,
    page: &PageRequest,
) -> Result<Page<T>> {
    let size = match page.size {
        0 => DEFAULT_PAGE_SIZE,
        n if n < 0 => return Err(InvalidField::new("page_size", "must not be negative").into()),
        n => (n as usize).min(MAX_PAGE_SIZE),
    };
    let after = if page.token.is_empty() {
        None
    } else {
        let bad = || InvalidField::new("page_token", "not a token returned by this server");
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&page.token)
            .map_err(|_| bad())?;
        let id = String::from_utf8(raw).map_err(|_| bad())?;
        pushwire_common::domain::validate_id(&id).map_err(|_| bad())?;
        Some(id)
    };
    let mut rest = items
        .filter(|(id, _)| after.as_ref().is_none_or(|a| id > a))
        .peekable();
    let mut out = Vec::with_capacity(size.min(64));
    let mut last = None;
    while out.len() < size {
        let Some((id, item)) = rest.next() else { break };
        out.push(item);
        last = Some(id);
    }
    let next_token = match (rest.peek(), last) {
        (Some(_), Some(last)) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last),
        _ => String::new(),
    };
    Ok(Page {
        items: out,
        next_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<(String, u32)> = (0..7).map(|i| (format!("id-{i}"), i)).collect();
        let mut seen = Vec::new();
        let mut req = PageRequest {
            size: 3,
            token: String::new(),
        };
        loop {
            let page = paginate(items.clone().into_iter(), &req).unwrap();
            seen.extend(page.items);
            if page.next_token.is_empty() {
                break;
            }
            req.token = page.next_token;
        }
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        let bad = PageRequest {
            size: 3,
            token: "%%%".into(),
        };
        assert!(matches!(
            paginate(items.into_iter(), &bad),
            Err(ServiceError::InvalidArgument(_))
        ));
    }

    #[test]
    fn generated_ids_are_valid() {
        for _ in 0..100 {
            pushwire_common::domain::validate_id(&generate_id()).unwrap();
        }
    }
}
