//! The routing table: every account's integrations and push scopes at one config revision,
//! immutable, and the routing of a placement through `matching::resolve` (the one push-scope
//! matcher). Built and updated from domain values only ([`Snapshot`], [`Change`]): decoding the
//! `WatchConfig` messages is the config watch's job.
//!
//! A new revision costs in proportion to what it changes, not to the whole configuration: the
//! accounts live in a persistent hash map (a hash array mapped trie), so the new table copies
//! only the few trie nodes on the path to each changed account and shares every other node,
//! account and integration with the previous table. A changed account is copied, as the
//! `Arc`s of its integrations and scopes, and only the scopes a change can move are
//! reclassified: bounded by the control plane's per-account limits
//! (`--max-integrations-per-account`, `--max-push-scopes-per-account`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use pushwire_common::domain::matching::{self, Placement};
use pushwire_common::domain::{
    AccountName, Integration, IntegrationName, PushScope, PushScopeName,
};
use rpds::HashTrieMapSync;

use super::Route;

/// The whole configuration at one revision, as a `WatchConfig` snapshot carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every integration, disabled ones included.
    pub integrations: Vec<Integration>,
    /// Every push scope.
    pub push_scopes: Vec<PushScope>,
}

/// One change to the configuration, as a `WatchConfig` message carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// An integration was created or updated.
    UpsertIntegration(Integration),
    /// An integration was deleted (its scopes are deleted by changes of their own).
    DeleteIntegration(IntegrationName),
    /// A push scope was created or updated.
    UpsertPushScope(PushScope),
    /// A push scope was deleted.
    DeletePushScope(PushScopeName),
}

impl Change {
    /// When the resource it writes was written (control-plane clock); `None` for a deletion.
    pub fn written(&self) -> Option<SystemTime> {
        match self {
            Self::UpsertIntegration(i) => Some(i.update_time),
            Self::UpsertPushScope(s) => Some(s.update_time),
            Self::DeleteIntegration(_) | Self::DeletePushScope(_) => None,
        }
    }
}

/// One account's configuration, with what routing needs laid out ahead of time. Each entry is
/// an `Arc` shared with the tables before and after this one until it changes itself. Every
/// name in it is of this account, so entries are ordered and found by id alone (comparing
/// whole names would compare the account id each time).
#[derive(Debug, Default)]
struct Account {
    /// Every integration, disabled ones included (lookups by name need them), by name.
    integrations: Vec<Arc<Integration>>,
    /// Every push scope, in a precomputed order: the `routable` scopes first (those whose
    /// integration exists and is enabled), each part by name. Routing passes only that prefix
    /// to `resolve`, so scopes that can never fire cost nothing per participation.
    scopes: Vec<Arc<PushScope>>,
    /// How many of `scopes` are routable.
    routable: usize,
}

impl Account {
    /// Lays out an account's sources for routing.
    fn build(parts: Parts) -> Self {
        let Parts {
            mut integrations,
            mut routable,
            rest,
        } = parts;
        // Held until the account changes again: no spare room.
        integrations.shrink_to_fit();
        let count = routable.len();
        routable.reserve_exact(rest.len());
        routable.extend(rest);
        routable.shrink_to_fit();
        Self {
            integrations,
            scopes: routable,
            routable: count,
        }
    }

    /// The editable form, to apply changes to a copy: the same `Arc`s.
    fn parts(&self) -> Parts {
        Parts {
            integrations: self.integrations.clone(),
            routable: self.scopes[..self.routable].to_vec(),
            rest: self.scopes[self.routable..].to_vec(),
        }
    }

    /// The integration of this name (of this account), disabled or not.
    fn integration(&self, name: &IntegrationName) -> Option<&Arc<Integration>> {
        let n = find(&self.integrations, name.id(), |i| i.name.id()).ok()?;
        Some(&self.integrations[n])
    }
}

/// `integration`, its name holding `account`'s copy of the account id: the names of an account
/// share one (a decoded name has a copy of its own).
fn shared_integration(mut integration: Integration, account: &AccountName) -> Arc<Integration> {
    integration.name.share_account(account);
    // Neither routing nor delivery reads these, and a million integrations would keep them
    // all (docs/performance.md, "Configuration at scale").
    integration.display_name = String::new();
    integration.disabled_reason = String::new();
    Arc::new(integration)
}

/// `scope`, its names holding `account`'s copy of the account id.
fn shared_scope(mut scope: PushScope, account: &AccountName) -> Arc<PushScope> {
    scope.name.share_account(account);
    scope.integration.share_account(account);
    Arc::new(scope)
}

/// Where `name` is (`Ok`) or would go (`Err`) in `items`, sorted by `key`.
fn find<T, K: Ord + ?Sized>(items: &[T], name: &K, key: impl Fn(&T) -> &K) -> Result<usize, usize> {
    items.binary_search_by(|item| key(item).cmp(name))
}

/// Puts `item` in its place by `key` in the sorted `items`, replacing one of the same key.
fn upsert<T, K: Ord + ?Sized>(items: &mut Vec<T>, item: T, key: impl Fn(&T) -> &K) {
    match find(items, key(&item), &key) {
        Ok(n) => items[n] = item,
        Err(n) => items.insert(n, item),
    }
}

/// Takes the item of this key out of the sorted `items`, if there is one.
fn remove<T, K: Ord + ?Sized>(items: &mut Vec<T>, name: &K, key: impl Fn(&T) -> &K) {
    if let Ok(n) = find(items, name, key) {
        items.remove(n);
    }
}

/// Sources of one account while a snapshot or a batch of changes is applied, each by id: the
/// integrations, and the scopes split as routing wants them. A change reclassifies only the
/// scopes it can move (the scope itself, or the scopes of an integration that starts or stops
/// firing), so most changes do not read the account's other scopes.
#[derive(Default)]
struct Parts {
    integrations: Vec<Arc<Integration>>,
    /// Scopes whose integration exists and is enabled.
    routable: Vec<Arc<PushScope>>,
    /// The others.
    rest: Vec<Arc<PushScope>>,
}

impl Parts {
    fn is_empty(&self) -> bool {
        self.integrations.is_empty() && self.routable.is_empty() && self.rest.is_empty()
    }

    /// From what a snapshot gave, in any order (scopes in `rest`); of two entries of one name,
    /// the later wins.
    fn sorted(mut self) -> Self {
        last_wins(&mut self.integrations, |i| i.name.id());
        last_wins(&mut self.rest, |s| s.name.id());
        // `rest` is by id, so both parts stay sorted.
        let (routable, rest) = std::mem::take(&mut self.rest)
            .into_iter()
            .partition(|s| self.fires(s));
        Self {
            routable,
            rest,
            ..self
        }
    }

    /// Whether the integration of this id exists and is enabled.
    fn enabled(&self, id: &str) -> bool {
        find(&self.integrations, id, |i| i.name.id()).is_ok_and(|n| self.integrations[n].enabled)
    }

    /// Whether `scope` can fire: its integration exists and is enabled.
    fn fires(&self, scope: &PushScope) -> bool {
        // Same account: a pointer comparison, the names share the account's id.
        scope.integration.account() == scope.name.account() && self.enabled(scope.integration.id())
    }

    fn upsert_integration(&mut self, integration: Arc<Integration>) {
        let before = self.enabled(integration.name.id());
        let id = integration.name.id().to_owned();
        upsert(&mut self.integrations, integration, |i| i.name.id());
        self.reclassify(&id, before);
    }

    fn delete_integration(&mut self, name: &IntegrationName) {
        let before = self.enabled(name.id());
        remove(&mut self.integrations, name.id(), |i| i.name.id());
        self.reclassify(name.id(), before);
    }

    /// Moves the scopes of integration `id` to the other part when whether it fires changed.
    fn reclassify(&mut self, id: &str, before: bool) {
        if self.enabled(id) == before {
            return;
        }
        let (from, to) = if before {
            (&mut self.routable, &mut self.rest)
        } else {
            (&mut self.rest, &mut self.routable)
        };
        let (moving, staying): (Vec<_>, Vec<_>) = std::mem::take(from)
            .into_iter()
            .partition(|s| s.integration.id() == id && s.integration.account() == s.name.account());
        *from = staying;
        for scope in moving {
            upsert(to, scope, |s| s.name.id());
        }
    }

    fn upsert_scope(&mut self, scope: Arc<PushScope>) {
        // It may have been of another integration, so in the other part.
        self.delete_scope(&scope.name);
        let part = if self.fires(&scope) {
            &mut self.routable
        } else {
            &mut self.rest
        };
        upsert(part, scope, |s| s.name.id());
    }

    fn delete_scope(&mut self, name: &PushScopeName) {
        remove(&mut self.routable, name.id(), |s| s.name.id());
        remove(&mut self.rest, name.id(), |s| s.name.id());
    }
}

/// A table being built from a snapshot that comes in parts: each part is grouped by account
/// as it comes (while the control plane sends the next one), and [`TableBuilder::finish`]
/// builds the accounts once the last one came.
#[derive(Default)]
pub struct TableBuilder {
    parts: HashMap<AccountName, Parts>,
}

impl fmt::Debug for TableBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableBuilder")
            .field("accounts", &self.parts.len())
            .finish_non_exhaustive()
    }
}

impl TableBuilder {
    /// Adds what one part of the snapshot holds; of two entries of one name, the one added
    /// later wins.
    pub fn add(&mut self, part: Snapshot) {
        for integration in part.integrations {
            let (account, sources) = self.group(integration.name.account());
            sources
                .integrations
                .push(shared_integration(integration, &account));
        }
        for scope in part.push_scopes {
            let (account, sources) = self.group(scope.name.account());
            sources.rest.push(shared_scope(scope, &account));
        }
    }

    /// The table at `revision` of everything added.
    pub fn finish(self, revision: i64) -> RoutingTable {
        let mut table = RoutingTable {
            revision,
            ..RoutingTable::default()
        };
        for (account, sources) in self.parts {
            table.put(account, sources.sorted());
        }
        table
    }

    /// The account's entry, and the account name its names are to share.
    fn group(&mut self, account: &AccountName) -> (AccountName, &mut Parts) {
        entry(&mut self.parts, account, || {
            (account.clone(), Parts::default())
        })
    }
}

/// `account`'s entry in `parts`, made by `first` (the key to share and the parts to start
/// from) when it has none yet, and the account name its names are to share: the entry's key.
fn entry<'p>(
    parts: &'p mut HashMap<AccountName, Parts>,
    account: &AccountName,
    first: impl FnOnce() -> (AccountName, Parts),
) -> (AccountName, &'p mut Parts) {
    let key = match parts.get_key_value(account) {
        Some((key, _)) => key.clone(),
        None => {
            let (key, start) = first();
            parts.insert(key.clone(), start);
            key
        }
    };
    (key, parts.get_mut(account).expect("inserted above"))
}

/// Sorts `items` by `key`, keeping only the last of entries with the same key.
fn last_wins<T, K: Ord + ?Sized>(items: &mut Vec<T>, key: impl Fn(&T) -> &K) {
    items.reverse();
    // Stable: among equal keys the last given comes first now, and `dedup` keeps the first.
    items.sort_by(|a, b| key(a).cmp(key(b)));
    items.dedup_by(|a, b| key(a) == key(b));
}

/// The accounts of a table: a persistent map, so a copy is O(1) and a change copies only the
/// path to the changed entry.
type Accounts = HashTrieMapSync<AccountName, Arc<Account>>;

/// Children per node of [`Accounts`]. A change copies one node per level on its path (the
/// old table still holds them): 16 makes that about 4 × 16 entries at 200,000 accounts,
/// where rpds's default of 64 copies about 3 × 64 (docs/performance.md, "Routing table").
const ACCOUNTS_DEGREE: u8 = 16;

/// Every account's integrations and push scopes at one revision. Immutable: a new revision
/// makes a new table, sharing everything it did not change with the old one, so readers keep
/// routing on a consistent table while the next one is built.
#[derive(Clone)]
pub struct RoutingTable {
    revision: i64,
    accounts: Accounts,
    /// Integrations, all accounts together.
    integrations: usize,
    /// Push scopes, all accounts together.
    push_scopes: usize,
}

impl fmt::Debug for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole configuration would be huge; the shape is what logs need.
        f.debug_struct("RoutingTable")
            .field("revision", &self.revision)
            .field("accounts", &self.accounts.size())
            .field("integrations", &self.integrations)
            .field("push_scopes", &self.push_scopes)
            .finish()
    }
}

impl Default for RoutingTable {
    fn default() -> Self {
        Self {
            revision: 0,
            accounts: Accounts::new_sync_with_degree(ACCOUNTS_DEGREE),
            integrations: 0,
            push_scopes: 0,
        }
    }
}

impl RoutingTable {
    /// No configuration at all (revision 0): routes nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The config revision this table is at.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Builds the table at `revision` from a whole configuration.
    pub fn from_snapshot(revision: i64, snapshot: Snapshot) -> Self {
        let mut builder = TableBuilder::default();
        builder.add(snapshot);
        builder.finish(revision)
    }

    /// A new table at `revision`: this one with `changes` applied, in order, as one unit
    /// (the changes of one store transaction). Only the accounts the changes touch are
    /// rebuilt; the others are shared with `self`.
    pub fn apply(&self, revision: i64, changes: Vec<Change>) -> Self {
        let mut touched: HashMap<AccountName, Parts> = HashMap::new();
        for change in changes {
            match change {
                Change::UpsertIntegration(integration) => {
                    let (account, parts) = self.parts_of(&mut touched, integration.name.account());
                    parts.upsert_integration(shared_integration(integration, &account));
                }
                Change::DeleteIntegration(name) => {
                    // Its scopes stay (the control plane deletes them with their own
                    // changes); without the integration `resolve` ignores them anyway.
                    let (_, parts) = self.parts_of(&mut touched, name.account());
                    parts.delete_integration(&name);
                }
                Change::UpsertPushScope(scope) => {
                    let (account, parts) = self.parts_of(&mut touched, scope.name.account());
                    parts.upsert_scope(shared_scope(scope, &account));
                }
                Change::DeletePushScope(name) => {
                    let (_, parts) = self.parts_of(&mut touched, name.account());
                    parts.delete_scope(&name);
                }
            }
        }
        // O(1): the new table starts out sharing the whole map.
        let mut next = Self {
            revision,
            ..self.clone()
        };
        for (account, sources) in touched {
            next.put(account, sources);
        }
        next
    }

    /// Replaces `account` with one built from `sources` (or removes it when they are empty),
    /// keeping the counts.
    fn put(&mut self, account: AccountName, sources: Parts) {
        if let Some(old) = self.accounts.get(&account) {
            self.integrations -= old.integrations.len();
            self.push_scopes -= old.scopes.len();
        }
        if sources.is_empty() {
            self.accounts.remove_mut(&account);
            return;
        }
        let built = Account::build(sources);
        self.integrations += built.integrations.len();
        self.push_scopes += built.scopes.len();
        self.accounts.insert_mut(account, Arc::new(built));
    }

    /// The editable sources of `account` within `touched`, copied from this table on first
    /// use, and the account name its names share (this table's, when it has the account).
    fn parts_of<'t>(
        &self,
        touched: &'t mut HashMap<AccountName, Parts>,
        account: &AccountName,
    ) -> (AccountName, &'t mut Parts) {
        entry(touched, account, || {
            match self.accounts.get_key_value(account) {
                Some((key, existing)) => (key.clone(), existing.parts()),
                None => (account.clone(), Parts::default()),
            }
        })
    }

    /// The integrations a participation of `account` at `placement` goes to, ordered by
    /// integration name, each with the scope that decided it: exactly
    /// [`matching::resolve`] over the account's integrations and scopes (disabled
    /// integrations never route).
    pub fn route(&self, account: &AccountName, placement: &Placement<'_>) -> Vec<Route> {
        let Some(account) = self.accounts.get(account) else {
            return Vec::new();
        };
        if account.routable == 0 {
            return Vec::new();
        }
        matching::resolve(
            account.integrations.iter().map(|i| &**i),
            account.scopes[..account.routable].iter().map(|s| &**s),
            placement,
        )
        .into_iter()
        .filter_map(|push| {
            // Always present: `resolve` returns integrations it was given.
            account
                .integration(&push.integration.name)
                .map(|integration| Route {
                    integration: integration.clone(),
                    decided_by: push.decided_by.name.clone(),
                })
        })
        .collect()
    }

    /// The integration of this name as of this revision, disabled or not.
    pub fn integration(&self, name: &IntegrationName) -> Option<Arc<Integration>> {
        self.accounts
            .get(name.account())?
            .integration(name)
            .cloned()
    }

    /// Number of integrations, all accounts together.
    pub fn integration_count(&self) -> usize {
        self.integrations
    }

    /// Number of push scopes, all accounts together.
    pub fn push_scope_count(&self) -> usize {
        self.push_scopes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use pushwire_common::domain::{Audience, PushAction, ScopeTarget};

    use super::*;

    fn account(id: &str) -> AccountName {
        AccountName::from_id(id).unwrap()
    }

    fn integration(account_id: &str, id: &str, enabled: bool) -> Integration {
        Integration {
            enabled,
            ..Integration::example(account_id, id)
        }
    }

    fn scope(
        account_id: &str,
        id: &str,
        integration: &str,
        target: ScopeTarget,
        action: PushAction,
    ) -> PushScope {
        scope_for(account_id, id, integration, target, Audience::All, action)
    }

    fn scope_for(
        account_id: &str,
        id: &str,
        integration: &str,
        target: ScopeTarget,
        audience: Audience,
        action: PushAction,
    ) -> PushScope {
        let a = account(account_id);
        PushScope {
            name: PushScopeName::new(&a, id).unwrap(),
            integration: IntegrationName::new(&a, integration).unwrap(),
            target,
            audience,
            action,
            create_time: SystemTime::UNIX_EPOCH,
            update_time: SystemTime::UNIX_EPOCH,
            revision: 1,
        }
    }

    fn snapshot(integrations: &[Integration], scopes: &[PushScope]) -> Snapshot {
        Snapshot {
            integrations: integrations.to_vec(),
            push_scopes: scopes.to_vec(),
        }
    }

    fn upsert_integration(i: &Integration) -> Change {
        Change::UpsertIntegration(i.clone())
    }
    fn delete_integration(name: &str) -> Change {
        Change::DeleteIntegration(IntegrationName::parse(name).unwrap())
    }
    fn upsert_scope(s: &PushScope) -> Change {
        Change::UpsertPushScope(s.clone())
    }
    fn delete_scope(name: &str) -> Change {
        Change::DeletePushScope(PushScopeName::parse(name).unwrap())
    }

    fn web(id: &str) -> ScopeTarget {
        ScopeTarget::Website(id.into())
    }
    fn camp(id: &str) -> ScopeTarget {
        ScopeTarget::Campaign(id.into())
    }

    fn at(website: Option<&'static str>, campaign: &'static str) -> Placement<'static> {
        Placement {
            website_id: website,
            master_form_id: None,
            campaign_id: campaign,
            identified: false,
        }
    }

    fn ids(routes: &[Route]) -> Vec<(String, String)> {
        routes
            .iter()
            .map(|r| {
                (
                    r.integration.name.id().to_owned(),
                    r.decided_by.id().to_owned(),
                )
            })
            .collect()
    }

    /// The reference answer: `matching::resolve` over everything of the account, unfiltered.
    fn reference(
        integrations: &[Integration],
        scopes: &[PushScope],
        placement: &Placement<'_>,
    ) -> Vec<(String, String)> {
        matching::resolve(integrations, scopes, placement)
            .iter()
            .map(|p| {
                (
                    p.integration.name.id().to_owned(),
                    p.decided_by.name.id().to_owned(),
                )
            })
            .collect()
    }

    fn acme() -> (Vec<Integration>, Vec<PushScope>) {
        let integrations = vec![
            integration("acme", "crm", true),
            integration("acme", "erp", true),
            integration("acme", "off", false),
        ];
        let scopes = vec![
            scope("acme", "crm-web-7", "crm", web("7"), PushAction::Push),
            scope(
                "acme",
                "crm-not-99",
                "crm",
                camp("99"),
                PushAction::DoNotPush,
            ),
            scope(
                "acme",
                "erp-all",
                "erp",
                ScopeTarget::Account,
                PushAction::Push,
            ),
            scope(
                "acme",
                "off-all",
                "off",
                ScopeTarget::Account,
                PushAction::Push,
            ),
            scope(
                "acme",
                "ghost-all",
                "ghost",
                ScopeTarget::Account,
                PushAction::Push,
            ),
        ];
        (integrations, scopes)
    }

    #[test]
    fn a_snapshot_added_in_parts_builds_the_table_of_the_whole() {
        let (mut integrations, scopes) = acme();
        integrations.push(integration("beta", "hub", true));
        let whole = RoutingTable::from_snapshot(4, snapshot(&integrations, &scopes));
        // Scopes before their integrations, accounts spread over parts, and an entry given
        // again in a later part (with "erp" disabled): the later one wins, as in one part.
        let mut erp_off = integrations[1].clone();
        erp_off.enabled = false;
        let mut builder = TableBuilder::default();
        builder.add(snapshot(&[erp_off], &scopes[..2]));
        builder.add(snapshot(&integrations[2..], &scopes[2..]));
        builder.add(snapshot(&integrations[..2], &[]));
        let built = builder.finish(4);
        assert_eq!(built.revision(), 4);
        assert_eq!(
            (built.integration_count(), built.push_scope_count()),
            (whole.integration_count(), whole.push_scope_count())
        );
        assert_eq!(recount(&built), recount(&whole));
        for (account, placement) in [
            ("acme", at(Some("7"), "1")),
            ("acme", at(Some("7"), "99")),
            ("acme", at(None, "1")),
            ("beta", at(None, "1")),
        ] {
            let account = self::account(account);
            assert_eq!(
                ids(&built.route(&account, &placement)),
                ids(&whole.route(&account, &placement)),
                "{account} {placement:?}"
            );
        }
        let erp = IntegrationName::parse("accounts/acme/integrations/erp").unwrap();
        assert!(
            built.integration(&erp).unwrap().enabled,
            "the later entry won"
        );
    }

    #[test]
    fn empty_table_routes_nothing() {
        let t = RoutingTable::empty();
        assert_eq!(t.revision(), 0);
        assert!(t.route(&account("acme"), &at(Some("7"), "1")).is_empty());
        assert!(
            t.integration(&IntegrationName::parse("accounts/acme/integrations/crm").unwrap())
                .is_none()
        );
    }

    #[test]
    fn snapshot_routes_like_resolve() {
        let (integrations, scopes) = acme();
        let t = RoutingTable::from_snapshot(7, snapshot(&integrations, &scopes));
        assert_eq!(t.revision(), 7);
        assert_eq!((t.integration_count(), t.push_scope_count()), (3, 5));
        let acme = account("acme");
        let placements = [
            at(Some("7"), "1"),
            at(Some("7"), "99"),
            at(Some("8"), "1"),
            at(None, "1"),
            Placement {
                identified: true,
                ..at(Some("7"), "2")
            },
        ];
        for p in &placements {
            assert_eq!(
                ids(&t.route(&acme, p)),
                reference(&integrations, &scopes, p),
                "{p:?}"
            );
        }
        assert_eq!(
            ids(&t.route(&acme, &at(Some("7"), "1"))),
            [
                ("crm".into(), "crm-web-7".into()),
                ("erp".into(), "erp-all".into())
            ]
        );
        assert_eq!(
            ids(&t.route(&acme, &at(Some("7"), "99"))),
            [("erp".to_owned(), "erp-all".to_owned())]
        );
        assert!(t.route(&account("other"), &at(Some("7"), "1")).is_empty());
        // Disabled integrations never route but can still be looked up.
        let off = t
            .integration(&IntegrationName::parse("accounts/acme/integrations/off").unwrap())
            .unwrap();
        assert!(!off.enabled);
        // Routes hand out the table's own Arcs, not copies.
        let routes = t.route(&acme, &at(Some("7"), "1"));
        let crm = t.integration(&routes[0].integration.name).unwrap();
        assert!(Arc::ptr_eq(&routes[0].integration, &crm));
    }

    #[test]
    fn route_agrees_with_resolve_on_generated_configs() {
        // A deterministic spread of scopes over a few integrations, targets, audiences and
        // actions; every placement of a small grid must give resolve's answer.
        let ints: Vec<Integration> = (0..6)
            .map(|n| integration("acme", &format!("i{n}"), n % 4 != 3))
            .collect();
        let targets = [
            ScopeTarget::Account,
            web("1"),
            web("2"),
            ScopeTarget::MasterForm("f".into()),
            camp("1"),
            camp("2"),
        ];
        let audiences = [Audience::All, Audience::Identified, Audience::Anonymous];
        let mut scopes = Vec::new();
        let mut x: u32 = 12345;
        for n in 0..120 {
            // A small LCG: reproducible without a rand dependency in the test.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let pick = |m: u32, shift: u32| ((x >> shift) % m) as usize;
            let action = if pick(3, 4) == 0 {
                PushAction::DoNotPush
            } else {
                PushAction::Push
            };
            scopes.push(scope_for(
                "acme",
                &format!("s{n:03}"),
                &format!("i{}", pick(7, 8)), // i6 does not exist
                targets[pick(6, 12)].clone(),
                audiences[pick(3, 16)],
                action,
            ));
        }
        let t = RoutingTable::from_snapshot(1, snapshot(&ints, &scopes));
        let mut checked = 0;
        for website in [None, Some("1"), Some("2"), Some("3")] {
            for form in [None, Some("f"), Some("g")] {
                for campaign in ["1", "2", "3"] {
                    for identified in [false, true] {
                        let p = Placement {
                            website_id: website,
                            master_form_id: form,
                            campaign_id: campaign,
                            identified,
                        };
                        let want = reference(&ints, &scopes, &p);
                        checked += usize::from(!want.is_empty());
                        assert_eq!(ids(&t.route(&account("acme"), &p)), want, "{p:?}");
                    }
                }
            }
        }
        assert!(
            checked > 20,
            "the grid should exercise real routes, got {checked}"
        );
    }

    #[test]
    fn changes_of_both_kinds_apply_in_order() {
        let (integrations, scopes) = acme();
        let t1 = RoutingTable::from_snapshot(10, snapshot(&integrations, &scopes));
        let acme = account("acme");
        let p = at(Some("7"), "1");

        // Enable "off", add a campaign exclusion for erp, delete crm's website scope.
        let t2 = t1.apply(
            11,
            vec![
                upsert_integration(&integration("acme", "off", true)),
                upsert_scope(&scope(
                    "acme",
                    "erp-not-1",
                    "erp",
                    camp("1"),
                    PushAction::DoNotPush,
                )),
                delete_scope("accounts/acme/pushScopes/crm-web-7"),
            ],
        );
        assert_eq!(t2.revision(), 11);
        assert_eq!(
            ids(&t2.route(&acme, &p)),
            [("off".to_owned(), "off-all".to_owned())]
        );
        // The old table is untouched (readers may still hold it).
        assert_eq!(t1.route(&acme, &p).len(), 2);

        // Delete the integration: its scopes stay but it no longer routes; an upsert after a
        // delete in one batch wins (order matters).
        let t3 = t2.apply(
            12,
            vec![
                delete_integration("accounts/acme/integrations/off"),
                upsert_integration(&integration("acme", "ghost", true)),
            ],
        );
        assert_eq!(
            ids(&t3.route(&acme, &p)),
            [("ghost".to_owned(), "ghost-all".to_owned())]
        );
        assert!(
            t3.integration(&IntegrationName::parse("accounts/acme/integrations/off").unwrap())
                .is_none()
        );
        assert_eq!(t3.push_scope_count(), 5);
        assert_eq!(recount(&t3), (3, 5));

        // A new account appears; deleting everything of it removes it again.
        let t4 = t3.apply(
            13,
            vec![
                upsert_integration(&integration("beta", "hub", true)),
                upsert_scope(&scope(
                    "beta",
                    "all",
                    "hub",
                    ScopeTarget::Account,
                    PushAction::Push,
                )),
            ],
        );
        assert_eq!(
            ids(&t4.route(&account("beta"), &p)),
            [("hub".to_owned(), "all".to_owned())]
        );
        let t5 = t4.apply(
            14,
            vec![
                delete_scope("accounts/beta/pushScopes/all"),
                delete_integration("accounts/beta/integrations/hub"),
            ],
        );
        assert!(!t5.accounts.contains_key(&account("beta")));
        assert_eq!(
            (t5.integration_count(), t5.push_scope_count()),
            recount(&t5)
        );
        // Deleting what does not exist is harmless (a change the table already reflects).
        let t6 = t5.apply(15, vec![delete_scope("accounts/beta/pushScopes/none")]);
        assert!(t6.route(&account("beta"), &p).is_empty());
    }

    #[test]
    fn changes_share_untouched_accounts() {
        let (mut integrations, mut scopes) = acme();
        integrations.push(integration("beta", "hub", true));
        scopes.push(scope(
            "beta",
            "all",
            "hub",
            ScopeTarget::Account,
            PushAction::Push,
        ));
        let t1 = RoutingTable::from_snapshot(1, snapshot(&integrations, &scopes));
        let t2 = t1.apply(
            2,
            vec![upsert_scope(&scope(
                "acme",
                "crm-all",
                "crm",
                ScopeTarget::Account,
                PushAction::Push,
            ))],
        );
        assert!(Arc::ptr_eq(
            &t1.accounts[&account("beta")],
            &t2.accounts[&account("beta")]
        ));
        assert!(!Arc::ptr_eq(
            &t1.accounts[&account("acme")],
            &t2.accounts[&account("acme")]
        ));
        let hub = IntegrationName::parse("accounts/beta/integrations/hub").unwrap();
        assert!(Arc::ptr_eq(
            &t1.integration(&hub).unwrap(),
            &t2.integration(&hub).unwrap()
        ));
        // Inside the touched account, unchanged integrations keep their Arc too.
        let erp = IntegrationName::parse("accounts/acme/integrations/erp").unwrap();
        assert!(Arc::ptr_eq(
            &t1.integration(&erp).unwrap(),
            &t2.integration(&erp).unwrap()
        ));
        // An empty batch shares everything.
        let t3 = t2.apply(3, Vec::new());
        assert!(
            t2.accounts
                .iter()
                .all(|(a, acc)| Arc::ptr_eq(acc, &t3.accounts[a]))
        );
    }

    #[test]
    fn the_table_drops_what_routing_and_delivery_never_read() {
        let (integrations, scopes) = acme();
        assert!(integrations.iter().all(|i| !i.display_name.is_empty()));
        let t1 = RoutingTable::from_snapshot(1, snapshot(&integrations, &scopes));
        let mut disabled = integrations[0].clone();
        disabled.disabled_reason = "by an admin".into();
        let t2 = t1.apply(2, vec![Change::UpsertIntegration(disabled)]);
        for t in [&t1, &t2] {
            let acme = &t.accounts[&account("acme")];
            assert_eq!(acme.integrations.len(), integrations.len());
            assert!(
                acme.integrations
                    .iter()
                    .all(|i| i.display_name.is_empty() && i.disabled_reason.is_empty())
            );
        }
    }

    /// The counts kept by `apply`, recomputed from the accounts.
    fn recount(t: &RoutingTable) -> (usize, usize) {
        t.accounts.values().fold((0, 0), |(i, s), a| {
            (i + a.integrations.len(), s + a.scopes.len())
        })
    }

    #[test]
    fn a_change_copies_only_its_own_account() {
        // Many accounts, so the trie has several levels; then one change to one of them.
        let mut integrations = Vec::new();
        let mut scopes = Vec::new();
        for n in 0..2000 {
            let a = format!("a{n}");
            integrations.push(integration(&a, "hub", true));
            scopes.push(scope(
                &a,
                "all",
                "hub",
                ScopeTarget::Account,
                PushAction::Push,
            ));
        }
        let t1 = RoutingTable::from_snapshot(1, snapshot(&integrations, &scopes));
        let t2 = t1.apply(2, vec![upsert_integration(&integration("a7", "crm", true))]);
        assert_eq!(
            (t2.integration_count(), t2.push_scope_count()),
            (2001, 2000)
        );
        assert_eq!(recount(&t2), (2001, 2000));
        // While both tables are alive, every account the change did not touch is still held
        // once: the trie node holding it is shared, not copied. A table that copied its
        // accounts map on each change (even one of `Arc`s) would hold each twice.
        let mut untouched = 0;
        for (name, acc) in t2.accounts.iter() {
            if name.id() == "a7" {
                assert!(!Arc::ptr_eq(acc, &t1.accounts[name]));
                assert_eq!(Arc::strong_count(acc), 1);
            } else {
                assert!(Arc::ptr_eq(acc, &t1.accounts[name]), "{name}");
                assert_eq!(Arc::strong_count(acc), 1, "{name} was copied");
                untouched += 1;
            }
        }
        assert_eq!(untouched, 1999);
        // Within the changed account, the integration and scope that did not change are the
        // previous table's, shared.
        let hub = IntegrationName::parse("accounts/a7/integrations/hub").unwrap();
        assert!(Arc::ptr_eq(
            &t1.integration(&hub).unwrap(),
            &t2.integration(&hub).unwrap()
        ));
        assert!(Arc::ptr_eq(
            &t1.accounts[&account("a7")].scopes[0],
            &t2.accounts[&account("a7")].scopes[0]
        ));
        // The previous table is intact.
        assert_eq!(t1.integration_count(), 2000);
        assert!(
            t1.integration(&IntegrationName::parse("accounts/a7/integrations/crm").unwrap())
                .is_none()
        );
    }

    /// An account's layout: its integrations, and its scopes as routing sees them.
    fn layout(t: &RoutingTable, id: &str) -> Option<(Vec<String>, Vec<String>, usize)> {
        let a = t.accounts.get(&account(id))?;
        Some((
            a.integrations.iter().map(|i| i.name.to_string()).collect(),
            a.scopes.iter().map(|s| s.name.to_string()).collect(),
            a.routable,
        ))
    }

    #[test]
    fn changes_lay_accounts_out_as_a_snapshot_would() {
        // Random batches of every kind of change (re-pointed scopes, scopes of missing or
        // disabled integrations, deletes of what is not there); after each, the account must
        // be laid out exactly as a table built from the whole configuration lays it out.
        let mut ints: BTreeMap<String, Integration> = BTreeMap::new();
        let mut scopes: BTreeMap<String, PushScope> = BTreeMap::new();
        let mut t = RoutingTable::empty();
        let mut x: u32 = 777;
        let mut next = |m: u32| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (x >> 8) % m
        };
        for revision in 1..300 {
            let mut batch = Vec::new();
            for _ in 0..=next(3) {
                let i = format!("i{}", next(6));
                let s = format!("s{:02}", next(30));
                batch.push(match next(4) {
                    0 => upsert_integration(&integration("acme", &i, next(3) != 0)),
                    1 => delete_integration(&format!("accounts/acme/integrations/{i}")),
                    2 => upsert_scope(&scope("acme", &s, &i, web("1"), PushAction::Push)),
                    _ => delete_scope(&format!("accounts/acme/pushScopes/{s}")),
                });
            }
            for change in &batch {
                match change {
                    Change::UpsertIntegration(i) => {
                        ints.insert(i.name.id().into(), i.clone());
                    }
                    Change::DeleteIntegration(n) => {
                        ints.remove(n.id());
                    }
                    Change::UpsertPushScope(s) => {
                        scopes.insert(s.name.id().into(), s.clone());
                    }
                    Change::DeletePushScope(n) => {
                        scopes.remove(n.id());
                    }
                }
            }
            t = t.apply(revision, batch);
            let whole = RoutingTable::from_snapshot(
                revision,
                Snapshot {
                    integrations: ints.values().cloned().collect(),
                    push_scopes: scopes.values().cloned().collect(),
                },
            );
            assert_eq!(layout(&t, "acme"), layout(&whole, "acme"), "at {revision}");
            assert_eq!(recount(&t), (ints.len(), scopes.len()));
            assert_eq!(
                (t.integration_count(), t.push_scope_count()),
                (ints.len(), scopes.len())
            );
        }
        assert!(
            layout(&t, "acme").is_some_and(|(_, s, routable)| routable > 0 && routable < s.len()),
            "the sequence should end with both kinds of scopes: {:?}",
            layout(&t, "acme")
        );
    }

    #[test]
    fn a_snapshot_keeps_the_last_of_duplicate_names() {
        let first = integration("acme", "crm", true);
        let last = integration("acme", "crm", false);
        let t = RoutingTable::from_snapshot(1, snapshot(&[first, last], &[]));
        assert_eq!(t.integration_count(), 1);
        let crm = IntegrationName::parse("accounts/acme/integrations/crm").unwrap();
        assert!(!t.integration(&crm).unwrap().enabled);
    }

    #[test]
    fn debug_is_a_summary_without_secrets() {
        let mut i = integration("acme", "crm", true);
        i.secrets = vec![pushwire_common::domain::SigningSecret {
            secret: pushwire_common::domain::Secret::new("s3cr3t-value"),
            expire_time: None,
        }];
        let t = RoutingTable::from_snapshot(4, snapshot(&[i], &[]));
        let printed = format!("{t:?}");
        assert!(
            printed.contains("revision: 4") && !printed.contains("s3cr3t"),
            "{printed}"
        );
    }
}
