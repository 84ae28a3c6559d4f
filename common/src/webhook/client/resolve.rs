//! Name resolution with the SSRF guard: every answer is vetted, and only vetted addresses
//! reach the connector, which dials exactly those. A refusal travels through reqwest's error
//! chain as a [`ResolveFailure`], where [`error`](super::error) finds it again.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::webhook::ssrf::{self, AllowList, NonPublic};

/// Most resolved addresses handed to the connector for one host (all are vetted first).
pub(super) const MAX_ADDRS: usize = 16;

/// A host name lookup: every address the name has (ports are ignored).
pub(super) type LookupFn = dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
    + Send
    + Sync;

/// Resolves with the system resolver and refuses the host when any answer is not public and
/// not allow-listed: a name mixing public and private answers is an SSRF attempt, not a
/// choice. Only vetted addresses are handed to the connector, which dials those very
/// addresses: nothing is looked up twice, so a DNS answer that changes between the check and
/// the connection (DNS rebinding) cannot slip a private address in.
pub(super) struct VettingResolver {
    allow: Arc<AllowList>,
    /// `None`: the system resolver.
    lookup: Option<Arc<LookupFn>>,
}

impl fmt::Debug for VettingResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VettingResolver")
            .field("allow", &self.allow)
            .field("system_lookup", &self.lookup.is_none())
            .finish()
    }
}

/// A resolution refused by [`VettingResolver`]; found again in reqwest's error chain.
#[derive(Debug, thiserror::Error)]
pub(super) enum ResolveFailure {
    #[error("{host} resolves to {addr}, which is {class}, {}", class.verdict())]
    Blocked {
        host: String,
        addr: IpAddr,
        class: NonPublic,
    },
    #[error("{host}: {reason}")]
    Lookup { host: String, reason: String },
}

impl VettingResolver {
    /// Vets against `allow`; looks names up with `lookup`, or the system resolver when `None`.
    pub(super) fn new(allow: Arc<AllowList>, lookup: Option<Arc<LookupFn>>) -> Self {
        Self { allow, lookup }
    }
}

impl Resolve for VettingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        let lookup = self.lookup.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let looked_up = match lookup {
                None => tokio::net::lookup_host((host.clone(), 0))
                    .await
                    .map(Iterator::collect),
                Some(lookup) => lookup(host.clone()).await,
            };
            let answers: Vec<SocketAddr> = match looked_up {
                Ok(addrs) => addrs,
                Err(e) => {
                    return Err(ResolveFailure::Lookup {
                        host,
                        reason: e.to_string(),
                    }
                    .into());
                }
            };
            let vetted = vet_answers(host, answers, &allow)?;
            let addrs: Addrs = Box::new(vetted.into_iter());
            Ok(addrs)
        })
    }
}

/// All of a host's answers must pass [`ssrf::vet`]; at most [`MAX_ADDRS`] of them are kept.
pub(super) fn vet_answers(
    host: String,
    answers: Vec<SocketAddr>,
    allow: &AllowList,
) -> Result<Vec<SocketAddr>, ResolveFailure> {
    if answers.is_empty() {
        return Err(ResolveFailure::Lookup {
            host,
            reason: "no addresses".into(),
        });
    }
    if let Some((addr, blocked)) = answers
        .iter()
        .find_map(|a| ssrf::vet(a.ip(), allow).err().map(|b| (a.ip(), b)))
    {
        return Err(ResolveFailure::Blocked {
            host,
            addr,
            class: blocked.class,
        });
    }
    let mut answers = answers;
    answers.truncate(MAX_ADDRS);
    Ok(answers)
}
