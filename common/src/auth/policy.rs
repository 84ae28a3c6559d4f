//! What a token may do: its [`Role`] against the [`Action`] of a call, and the [`Accounts`]
//! it may use. A refusal is a [`Denied`]; the server layer turns it into `PERMISSION_DENIED`
//! (see [`super::layer`]).

use std::fmt;

use crate::domain::AccountName;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Manage integrations and push scopes (TestIntegration included), read them, resolve,
    /// publish participations, for its accounts.
    Admin,
    /// Read integrations and push scopes, resolve pushes, for its accounts.
    Viewer,
    /// Publish participations (IngestService), for its accounts.
    Publisher,
    /// What a worker needs: WatchConfig (every account's configuration, secrets included) and
    /// disabling an integration that answered 410 Gone. Always for all accounts.
    Worker,
}

impl Role {
    /// Every role, in the order the token file documents them.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Viewer, Role::Publisher, Role::Worker];

    /// The name used in token files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Publisher => "publisher",
            Role::Worker => "worker",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether this role may do `action` (on the accounts of its token).
    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Admin => matches!(action, Read | Manage | Disable | Publish),
            Role::Viewer => matches!(action, Read),
            Role::Publisher => matches!(action, Publish),
            Role::Worker => matches!(action, WatchConfig | Disable),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call does, as far as permissions go; each RPC names one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Get, List, ResolvePushes.
    Read,
    /// Create, Update, Delete, TestIntegration.
    Manage,
    /// An UpdateIntegration that only sets `enabled: false` and `disabled_reason` (a worker
    /// after 410 Gone).
    Disable,
    /// Publish, PublishOne.
    Publish,
    /// WatchConfig: every account's configuration with its secrets.
    WatchConfig,
}

impl Action {
    fn describe(self) -> &'static str {
        match self {
            Action::Read => "read integrations and push scopes",
            Action::Manage => "change or test integrations and push scopes",
            Action::Disable => "disable integrations",
            Action::Publish => "publish participations",
            Action::WatchConfig => "watch the configuration",
        }
    }
}

/// The accounts a token may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accounts {
    /// Every account (`"*"` in the token file).
    All,
    /// These accounts only.
    Only(Vec<AccountName>),
}

/// Who is calling: what a known token stands for. Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// A label for logs (the token file's `name`).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Where.
    pub accounts: Accounts,
}

/// Why a known token may not make a call; the server answers `PERMISSION_DENIED` with this
/// text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The role does not allow the action.
    #[error("the {role} role may not {}", .action.describe())]
    Role {
        /// The token's role.
        role: Role,
        /// What the call does.
        action: Action,
    },
    /// The token may not use this account.
    #[error("this token may not use {0}")]
    Account(AccountName),
    /// The call covers every account and the token is limited to some.
    #[error("this call covers every account; the token is limited to some")]
    AllAccounts,
}

impl Principal {
    /// A principal for every account.
    pub fn everywhere(name: impl Into<String>, role: Role) -> Self {
        Self {
            name: name.into(),
            role,
            accounts: Accounts::All,
        }
    }

    /// `Ok` when the role allows `action`.
    pub fn allow(&self, action: Action) -> Result<(), Denied> {
        if self.role.allows(action) {
            return Ok(());
        }
        tracing::info!(token = %self.name, role = %self.role, ?action, "permission denied: role");
        Err(Denied::Role {
            role: self.role,
            action,
        })
    }

    /// `Ok` when the token may use `account`. Decided from the token
    /// alone, before anything is looked up: the answer is the same whether or not the account
    /// or the resource exists.
    pub fn account(&self, account: &AccountName) -> Result<(), Denied> {
        let allowed = match &self.accounts {
            Accounts::All => true,
            Accounts::Only(list) => list.contains(account),
        };
        if allowed {
            return Ok(());
        }
        tracing::info!(token = %self.name, %account, "permission denied: account");
        Err(Denied::Account(account.clone()))
    }

    /// `Ok` when the token may use every account.
    pub fn all_accounts(&self) -> Result<(), Denied> {
        if self.accounts == Accounts::All {
            return Ok(());
        }
        tracing::info!(token = %self.name, "permission denied: needs all accounts");
        Err(Denied::AllAccounts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_the_readme_says() {
        use Action::*;
        let table = [
            (Role::Admin, [true, true, true, true, false]),
            (Role::Viewer, [true, false, false, false, false]),
            (Role::Publisher, [false, false, false, true, false]),
            (Role::Worker, [false, false, true, false, true]),
        ];
        for (role, want) in table {
            for (action, allowed) in [Read, Manage, Disable, Publish, WatchConfig]
                .into_iter()
                .zip(want)
            {
                assert_eq!(role.allows(action), allowed, "{role} {action:?}");
            }
        }
    }

    #[test]
    fn accounts_are_checked_without_looking_anything_up() {
        let p = Principal {
            name: "acme".into(),
            role: Role::Viewer,
            accounts: Accounts::Only(vec![AccountName::parse("accounts/1").unwrap()]),
        };
        assert!(
            p.account(&AccountName::parse("accounts/1").unwrap())
                .is_ok()
        );
        let denied = p
            .account(&AccountName::parse("accounts/2").unwrap())
            .unwrap_err();
        assert_eq!(denied.to_string(), "this token may not use accounts/2");
        assert_eq!(p.all_accounts(), Err(Denied::AllAccounts));
        assert_eq!(
            p.allow(Action::Manage).unwrap_err().to_string(),
            "the viewer role may not change or test integrations and push scopes"
        );
        assert_eq!(p.allow(Action::Read), Ok(()));
    }
}
