//! Push scope operations and `ResolvePushes`. A scope always refers to an existing integration
//! of its own account: creates and updates guard the integration's revision, and integration
//! deletes guard the scopes (see `integrations.rs`).

use std::time::SystemTime;

use pushwire_common::domain::convert::{self, InvalidField, Level};
use pushwire_common::domain::matching::{self, Placement};
use pushwire_common::domain::{
    AccountName, Audience, IntegrationName, PushAction, PushScope, PushScopeName, ScopeTarget,
};

use super::{
    AccountView, Attempt, Catalog, Memory, Page, PageRequest, Read, Result, ServiceError,
    check_etag, generate_id, paginate,
};
use crate::store::records;
use crate::store::{Compare, Op, Txn, keys};

/// The fields a create or update sets; `None` leaves a field as it is (or at its default).
#[derive(Clone, Debug, Default)]
pub struct PushScopePatch {
    /// Integration name, `accounts/{account}/integrations/{id}`.
    pub integration: Option<String>,
    /// Level.
    pub level: Option<Level>,
    /// Target id (empty for the account level).
    pub target_id: Option<String>,
    /// Audience.
    pub audience: Option<Audience>,
    /// Action.
    pub action: Option<PushAction>,
}

/// A firing integration and the scope that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPush {
    /// The integration.
    pub integration: IntegrationName,
    /// The deciding scope.
    pub decided_by: PushScopeName,
}

/// What a scope looks like before the patch is applied.
pub(super) struct Draft {
    integration: Option<IntegrationName>,
    level: Option<Level>,
    target_id: String,
    audience: Audience,
    action: PushAction,
}

impl Draft {
    /// What a create starts from: the defaults.
    pub(super) fn new() -> Self {
        Self {
            integration: None,
            level: None,
            target_id: String::new(),
            audience: Audience::All,
            action: PushAction::Push,
        }
    }

    fn of(s: &PushScope) -> Self {
        let (level, target_id) = match &s.target {
            ScopeTarget::Account => (Level::Account, String::new()),
            ScopeTarget::Website(id) => (Level::Website, id.clone()),
            ScopeTarget::MasterForm(id) => (Level::MasterForm, id.clone()),
            ScopeTarget::Campaign(id) => (Level::Campaign, id.clone()),
        };
        Self {
            integration: Some(s.integration.clone()),
            level: Some(level),
            target_id,
            audience: s.audience,
            action: s.action,
        }
    }

    /// Applies the patch and checks the result against the account.
    pub(super) fn apply(
        mut self,
        account: &AccountName,
        patch: PushScopePatch,
    ) -> Result<(IntegrationName, ScopeTarget, Audience, PushAction)> {
        if let Some(raw) = patch.integration {
            let name = IntegrationName::parse(&raw)
                .map_err(|e| InvalidField::new("push_scope.integration", e.to_string()))?;
            if name.account() != account {
                return Err(InvalidField::new(
                    "push_scope.integration",
                    format!("must be an integration of {account}"),
                )
                .into());
            }
            self.integration = Some(name);
        }
        if let Some(level) = patch.level {
            self.level = Some(level);
            if level == Level::Account && patch.target_id.is_none() {
                self.target_id.clear();
            }
        }
        if let Some(target) = patch.target_id {
            self.target_id = target;
        }
        if let Some(a) = patch.audience {
            self.audience = a;
        }
        if let Some(a) = patch.action {
            self.action = a;
        }
        let integration = self
            .integration
            .ok_or_else(|| InvalidField::new("push_scope.integration", "required"))?;
        let level = self
            .level
            .ok_or_else(|| InvalidField::new("push_scope.level", "required"))?;
        let target = convert::scope_target(level, &self.target_id)?;
        Ok((integration, target, self.audience, self.action))
    }
}

impl Catalog {
    /// Creates a push scope; `id` is generated when `None`.
    pub async fn create_push_scope(
        &self,
        account: &AccountName,
        id: Option<&str>,
        patch: PushScopePatch,
    ) -> Result<PushScope> {
        let mut name = match id {
            Some(id) => PushScopeName::new(account, id)
                .map_err(|e| InvalidField::new("push_scope_id", e.to_string()))?,
            None => PushScopeName::new(account, &generate_id()).expect("generated ids are valid"),
        };
        let (integration, target, audience, action) = Draft::new().apply(account, patch)?;
        let now = SystemTime::now();
        let (mut scope, revision) = self
            .transact(
                move || self.view(account),
                |view| {
                    if id.is_none() && view.scopes.contains_key(name.id()) {
                        name = PushScopeName::new(account, &generate_id())
                            .expect("generated ids are valid");
                        return Ok(Attempt::Again);
                    }
                    let scope = PushScope {
                        name: name.clone(),
                        integration: integration.clone(),
                        target: target.clone(),
                        audience,
                        action,
                        create_time: now,
                        update_time: now,
                        revision: 0,
                    };
                    let integration_rev = self.check_new_scope(&view, &scope)?;
                    let key = records::push_scope_key(&scope.name);
                    let txn = Txn {
                        compares: vec![
                            Compare::Absent(key.clone()),
                            Compare::ModRevision(
                                records::integration_key(&integration),
                                integration_rev,
                            ),
                            Compare::PrefixUnchangedSince {
                                prefix: keys::push_scopes_prefix(account.id()),
                                revision: view.revision,
                            },
                        ],
                        ops: vec![Op::Put {
                            key,
                            value: records::encode_push_scope(&scope),
                        }],
                    };
                    Ok(Attempt::Commit { txn, value: scope })
                },
            )
            .await?;
        scope.revision = revision;
        Ok(scope)
    }

    /// The checks of a new push scope against its account as read (shared by creates and
    /// imports): its id is free, the account is under `--max-push-scopes-per-account`, and
    /// [`check_scope`]. Returns the integration's revision, which the transaction guards with
    /// the account's prefix: concurrent creates cannot both take the last place.
    pub(super) fn check_new_scope(&self, view: &AccountView, scope: &PushScope) -> Result<i64> {
        if view.scopes.contains_key(scope.name.id()) {
            return Err(ServiceError::AlreadyExists(format!(
                "{} already exists",
                scope.name
            )));
        }
        let max = self.opts.max_push_scopes_per_account;
        if view.scopes.len() >= max {
            return Err(ServiceError::ResourceExhausted(format!(
                "{} has {} push scopes, the most allowed per account \
                 (--max-push-scopes-per-account {max}); delete one first",
                scope.name.account(),
                view.scopes.len()
            )));
        }
        check_scope(view, scope)
    }

    /// Reads one push scope from the store.
    async fn stored_push_scope(&self, name: &PushScopeName) -> Result<PushScope> {
        self.stored(&records::push_scope_key(name), name).await
    }

    /// Reads one push scope (from memory while the store is unavailable).
    pub async fn get_push_scope(&self, name: &PushScopeName) -> Result<Read<PushScope>> {
        self.read_one(&records::push_scope_key(name), name).await
    }

    /// Lists an account's push scopes by id, optionally only those of one integration (from
    /// memory while the store is unavailable).
    pub async fn list_push_scopes(
        &self,
        account: &AccountName,
        integration: Option<&IntegrationName>,
        page: &PageRequest,
    ) -> Result<Read<Page<PushScope>>> {
        let read = self
            .read_under::<PushScope>(&keys::push_scopes_prefix(account.id()))
            .await?;
        let items = read
            .value
            .into_iter()
            .filter(|s| integration.is_none_or(|i| &s.integration == i))
            .map(|s| (s.name.id().to_owned(), s));
        Ok(Read {
            value: paginate(items, page)?,
            stale_at: read.stale_at,
        })
    }

    /// Applies `patch` to a push scope; fails with ABORTED when `etag` is stale.
    pub async fn update_push_scope(
        &self,
        name: &PushScopeName,
        etag: Option<i64>,
        patch: PushScopePatch,
    ) -> Result<PushScope> {
        let (mut updated, revision) = self
            .transact(
                move || self.view(name.account()),
                |view| {
                    let current = view
                        .scopes
                        .get(name.id())
                        .ok_or_else(|| ServiceError::NotFound(name.to_string()))?;
                    check_etag(name, etag, current.revision)?;
                    let (integration, target, audience, action) =
                        Draft::of(current).apply(name.account(), patch.clone())?;
                    let updated = PushScope {
                        integration,
                        target,
                        audience,
                        action,
                        update_time: SystemTime::now(),
                        ..current.clone()
                    };
                    let integration_rev = check_scope(&view, &updated)?;
                    let key = records::push_scope_key(name);
                    let txn = Txn {
                        compares: vec![
                            Compare::ModRevision(key.clone(), current.revision),
                            Compare::ModRevision(
                                records::integration_key(&updated.integration),
                                integration_rev,
                            ),
                            Compare::PrefixUnchangedSince {
                                prefix: keys::push_scopes_prefix(name.account().id()),
                                revision: view.revision,
                            },
                        ],
                        ops: vec![Op::Put {
                            key,
                            value: records::encode_push_scope(&updated),
                        }],
                    };
                    Ok(Attempt::Commit {
                        txn,
                        value: updated,
                    })
                },
            )
            .await?;
        updated.revision = revision;
        Ok(updated)
    }

    /// Deletes a push scope.
    pub async fn delete_push_scope(&self, name: &PushScopeName, etag: Option<i64>) -> Result<()> {
        self.transact(
            move || self.stored_push_scope(name),
            |current| {
                check_etag(name, etag, current.revision)?;
                let key = records::push_scope_key(name);
                let txn = Txn {
                    compares: vec![Compare::ModRevision(key.clone(), current.revision)],
                    ops: vec![Op::Delete { key }],
                };
                Ok(Attempt::Commit { txn, value: () })
            },
        )
        .await?;
        Ok(())
    }

    /// The integrations that would fire for a participation at `placement`, with the scope
    /// that decided each, ordered by integration name (from memory while the store is
    /// unavailable).
    pub async fn resolve_pushes(
        &self,
        account: &AccountName,
        placement: &Placement<'_>,
    ) -> Result<Read<Vec<ResolvedPush>>> {
        let resolve = |integrations: &[pushwire_common::domain::Integration],
                       scopes: &[PushScope]| {
            matching::resolve(integrations, scopes, placement)
                .into_iter()
                .map(|p| ResolvedPush {
                    integration: p.integration.name.clone(),
                    decided_by: p.decided_by.name.clone(),
                })
                .collect()
        };
        let from_store = async {
            let view = self.view(account).await?;
            let integrations: Vec<_> = view.integrations.into_values().collect();
            let scopes: Vec<_> = view.scopes.into_values().collect();
            Ok(resolve(&integrations, &scopes))
        };
        let prefix = keys::account_prefix(account.id());
        self.read(from_store, |memory| {
            let integrations: Vec<_> = Memory::under(memory.integrations, &prefix)
                .cloned()
                .collect();
            let scopes: Vec<_> = Memory::under(memory.push_scopes, &prefix)
                .cloned()
                .collect();
            Ok(resolve(&integrations, &scopes))
        })
        .await
    }
}

/// Checks a scope against its account: its integration exists and no other scope has the same
/// rule. Returns the integration's revision, which the transaction guards.
fn check_scope(view: &AccountView, scope: &PushScope) -> Result<i64> {
    let integration = view
        .integrations
        .get(scope.integration.id())
        .ok_or_else(|| {
            ServiceError::FailedPrecondition(format!(
                "push_scope.integration: {} does not exist; create it first",
                scope.integration
            ))
        })?;
    let twin = view.scopes.values().find(|s| {
        s.name != scope.name
            && s.integration == scope.integration
            && s.target == scope.target
            && s.audience == scope.audience
    });
    if let Some(twin) = twin {
        return Err(ServiceError::AlreadyExists(format!(
            "{} already applies to the same integration, level, target and audience; update it instead",
            twin.name
        )));
    }
    Ok(integration.revision)
}
