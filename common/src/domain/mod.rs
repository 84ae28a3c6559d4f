//! Domain types of Pushwire: integrations, push scopes and their names, free of protobuf and
//! storage types. Conversions from and to the protobuf messages live in [`convert`]; the
//! push-scope matching used by both `ResolvePushes` and the worker's router in [`matching`].

pub mod convert;
pub mod matching;
mod names;
mod secret;

use std::time::SystemTime;

pub use names::{AccountName, IntegrationName, InvalidName, PushScopeName, validate_id};
pub use secret::Secret;

/// An HTTPS endpoint that receives an account's participations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Integration {
    /// `accounts/{account}/integrations/{integration}`.
    pub name: IntegrationName,
    /// Human-readable name, unique within the account.
    pub display_name: String,
    /// Endpoint URL (validated absolute http(s) URL).
    pub url: String,
    /// Whether participations are pushed.
    pub enabled: bool,
    /// Why it was disabled; empty when enabled or when no reason was given.
    pub disabled_reason: String,
    /// What to do with participations that are not completed.
    pub incomplete_participations: IncompletePolicy,
    /// Whether the body gets a `variables` object added (see [`crate::payload`]).
    pub payload_variables: PayloadVariables,
    /// One extra request header.
    pub auth_header: Option<AuthHeader>,
    /// Signing secrets, newest (current) first; previous ones carry the end of their grace
    /// period.
    pub secrets: Vec<SigningSecret>,
    /// Signature headers to send; never empty.
    pub signature_schemes: Vec<SignatureScheme>,
    /// When it was created.
    pub create_time: SystemTime,
    /// When it was last changed.
    pub update_time: SystemTime,
    /// Store revision of the last change (the etag).
    pub revision: i64,
}

impl Integration {
    /// A new integration as the API creates it before the request's fields apply: enabled,
    /// incomplete participations skipped, the body as published, no auth header and no secret,
    /// the Qualifio signature, created and updated at `now`, not stored yet (revision 0).
    pub fn new(name: IntegrationName, now: SystemTime) -> Self {
        Self {
            name,
            display_name: String::new(),
            url: String::new(),
            enabled: true,
            disabled_reason: String::new(),
            incomplete_participations: IncompletePolicy::Skip,
            payload_variables: PayloadVariables::AsPublished,
            auth_header: None,
            secrets: Vec::new(),
            signature_schemes: vec![SignatureScheme::Qualifio],
            create_time: now,
            update_time: now,
            revision: 0,
        }
    }

    /// A stored integration for tests: `id` of `account`, named after its id, posting to
    /// `https://{id}.example.org/hook`, at revision 1 (feature `test-fixtures`).
    #[cfg(any(test, feature = "test-fixtures"))]
    pub fn example(account: &str, id: &str) -> Self {
        let account = AccountName::from_id(account).expect("a valid account id");
        Self {
            display_name: id.to_owned(),
            url: format!("https://{id}.example.org/hook"),
            revision: 1,
            ..Self::new(
                IntegrationName::new(&account, id).expect("a valid integration id"),
                SystemTime::UNIX_EPOCH,
            )
        }
    }

    /// The secrets still valid at `now`, newest first.
    pub fn valid_secrets(&self, now: SystemTime) -> impl Iterator<Item = &Secret> {
        self.secrets
            .iter()
            .filter(move |s| s.expire_time.is_none_or(|t| t > now))
            .map(|s| &s.secret)
    }
}

/// What to do with participations whose state is not `COMPLETED`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IncompletePolicy {
    /// Send only completed participations.
    #[default]
    Skip,
    /// Send every participation.
    Send,
}

/// Which body an integration receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PayloadVariables {
    /// The document exactly as published.
    #[default]
    AsPublished,
    /// The document with a `variables` object added when it has none
    /// ([`crate::payload::add_variables`]).
    Add,
}

/// One extra header sent with every webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthHeader {
    /// Header name (an HTTP token).
    pub name: String,
    /// Header value (secret).
    pub value: Secret,
}

/// A signing secret, with the end of its rotation grace period once replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningSecret {
    /// The secret.
    pub secret: Secret,
    /// `None` for the current secret; for a replaced one, when it stops signing.
    pub expire_time: Option<SystemTime>,
}

/// A way of signing webhook requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SignatureScheme {
    /// `X-Qualifio-Signature: sha256=<hex>`.
    Qualifio,
    /// Standard Webhooks `webhook-signature: v1,<base64>`.
    StandardWebhooks,
}

/// A rule saying whether an integration fires for participations at one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushScope {
    /// `accounts/{account}/pushScopes/{scope}`.
    pub name: PushScopeName,
    /// Integration of the same account.
    pub integration: IntegrationName,
    /// Where it applies.
    pub target: ScopeTarget,
    /// Which participants it applies to.
    pub audience: Audience,
    /// What it decides.
    pub action: PushAction,
    /// When it was created.
    pub create_time: SystemTime,
    /// When it was last changed.
    pub update_time: SystemTime,
    /// Store revision of the last change (the etag).
    pub revision: i64,
}

/// The level of a push scope with its target id: invalid combinations cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ScopeTarget {
    /// Every participation of the account.
    Account,
    /// One website.
    Website(String),
    /// One master form.
    MasterForm(String),
    /// One campaign.
    Campaign(String),
}

impl ScopeTarget {
    /// Specificity: a matching scope of a higher level overrides lower ones.
    pub fn level(&self) -> u8 {
        match self {
            Self::Account => 0,
            Self::Website(_) => 1,
            Self::MasterForm(_) => 2,
            Self::Campaign(_) => 3,
        }
    }
}

/// Which participants a push scope applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Audience {
    /// Everyone.
    #[default]
    All,
    /// Identified participants only.
    Identified,
    /// Anonymous participants only.
    Anonymous,
}

/// What a matching push scope decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PushAction {
    /// Push.
    #[default]
    Push,
    /// Do not push (an exclusion).
    DoNotPush,
}
