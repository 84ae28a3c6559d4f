//! The worker's way to the control planes, shared by the config watch and the 410 consumer:
//! the channel type (calls carry the worker's token), the endpoint settings, and the set of
//! control planes ([`ControlPlanes`]) with the one in use.
//!
//! `--control-plane` lists one or more addresses; a name (`dns:///name:port`, as for a
//! Kubernetes headless service, or a host name in any form) stands for every address it
//! resolves to, resolved again on each failover cycle. The watch talks to one address at a
//! time and moves to the next one when its session fails ([`rotation`]), instead of a
//! balanced channel that would keep dead replicas in rotation; the 410 consumer asks the one
//! the watch uses first, then the others.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pushwire_common::auth::Bearer;
use pushwire_common::target::Target;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A channel to the control plane whose calls carry the worker's token.
pub type ControlPlaneChannel = InterceptedService<Channel, Bearer>;

/// HTTP/2 keep-alive ping interval: with [`KEEP_ALIVE_TIMEOUT`], bounds how long a control
/// plane whose host went silent (a dead node, a partition) holds the watch, about 10 s.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a keep-alive ping may go unanswered before the connection is dropped.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect timeout to one control plane address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An endpoint for the control plane with the settings the watch needs: a connect timeout,
/// and HTTP/2 keep-alives so a control plane that vanished without closing the connection (a
/// dead node, a network partition) is noticed and the watch moves on instead of waiting on
/// a silent stream forever. Add TLS to it as needed, then `connect_lazy()`.
pub fn endpoint(uri: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(uri.into())?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// Makes the endpoint of one address of a target (TLS checked against the target's host).
pub type Connect = dyn Fn(&Target, SocketAddr) -> Result<Endpoint, String> + Send + Sync;

/// One control plane address: a name for logs (no secrets) and a lazily connecting channel.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// `https://host:port`, `host:port`, or `name:port (address)` for a resolved name.
    pub name: String,
    /// The channel (connects on first use).
    pub channel: ControlPlaneChannel,
}

enum Source {
    /// Channels, as given (the in-process worker, tests).
    Fixed(Vec<Candidate>),
    /// The `--control-plane` entries, resolved on each call of [`ControlPlanes::candidates`].
    Targets {
        targets: Vec<Target>,
        bearer: Bearer,
        connect: Box<Connect>,
    },
}

struct Inner {
    source: Source,
    /// The control plane the watch has a working session with, if any.
    current: Mutex<Option<Candidate>>,
}

/// The control planes a worker may use, and the one in use; cheap to clone.
#[derive(Clone)]
pub struct ControlPlanes(Arc<Inner>);

impl std::fmt::Debug for ControlPlanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ControlPlanes");
        match &self.0.source {
            Source::Fixed(c) => d.field(
                "fixed",
                &c.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ),
            Source::Targets { targets, .. } => d.field("targets", targets),
        };
        d.finish_non_exhaustive()
    }
}

impl ControlPlanes {
    /// A single control plane reached through `channel`, called `name` in logs.
    pub fn fixed(channel: ControlPlaneChannel, name: impl Into<String>) -> Self {
        Self::channels(vec![Candidate {
            name: name.into(),
            channel,
        }])
    }

    /// The control planes reached through these channels, in this order.
    pub fn channels(candidates: Vec<Candidate>) -> Self {
        Self::with(Source::Fixed(candidates))
    }

    /// The control planes at `targets`, in this order, each address reached through the
    /// endpoint `connect` makes, with `bearer` on every call.
    pub fn targets(targets: Vec<Target>, bearer: Bearer, connect: Box<Connect>) -> Self {
        Self::with(Source::Targets {
            targets,
            bearer,
            connect,
        })
    }

    fn with(source: Source) -> Self {
        Self(Arc::new(Inner {
            source,
            current: Mutex::new(None),
        }))
    }

    /// Every control plane address, in the order of the list (a name's addresses in the
    /// resolver's order), names resolved now, duplicates dropped. A name that does not
    /// resolve is skipped (and logged).
    pub async fn candidates(&self) -> Vec<Candidate> {
        let (targets, bearer, connect) = match &self.0.source {
            Source::Fixed(c) => return c.clone(),
            Source::Targets {
                targets,
                bearer,
                connect,
            } => (targets, bearer, connect),
        };
        let mut out: Vec<Candidate> = Vec::new();
        for target in targets {
            let addrs = match target.resolve().await {
                Ok(addrs) => addrs,
                Err(e) => {
                    tracing::warn!(control_plane = %target, error = %e, "control plane: cannot resolve");
                    continue;
                }
            };
            if addrs.is_empty() {
                tracing::warn!(control_plane = %target, "control plane: the name has no address");
            }
            for addr in addrs {
                let name = candidate_name(target, addr);
                if out.iter().any(|c| c.name == name) {
                    continue;
                }
                match connect(target, addr) {
                    Ok(endpoint) => out.push(Candidate {
                        name,
                        channel: InterceptedService::new(endpoint.connect_lazy(), bearer.clone()),
                    }),
                    Err(e) => {
                        tracing::warn!(control_plane = %name, error = %e, "control plane: unusable address")
                    }
                }
            }
        }
        out
    }

    /// The control plane the watch has a working session with, if any.
    pub fn current(&self) -> Option<Candidate> {
        self.0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records the control plane in use (`None`: none works at the moment).
    pub fn set_current(&self, candidate: Option<Candidate>) {
        *self
            .0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = candidate;
    }

    /// The candidates for one call: the one in use first, then the others in list order.
    pub async fn for_call(&self) -> Vec<Candidate> {
        let mut all = self.candidates().await;
        if let Some(current) = self.current() {
            all.retain(|c| c.name != current.name);
            all.insert(0, current);
        }
        all
    }
}

/// How an address of `target` is named in logs and metrics: the entry itself for an address,
/// `name:port (address)` for a resolved name.
fn candidate_name(target: &Target, addr: SocketAddr) -> String {
    if target.is_name() {
        format!("{target} ({addr})")
    } else {
        target.to_string()
    }
}

/// The order in which to try `names` in the next failover cycle: starting with the one after
/// `last` (the address just used or tried), wrapping around, so that a failed control plane
/// is tried last; from the first when `last` is none or no longer in the list.
pub fn rotation<S: AsRef<str>>(names: &[S], last: Option<&str>) -> Vec<usize> {
    let start = last
        .and_then(|l| names.iter().position(|n| n.as_ref() == l))
        .map_or(0, |i| i + 1);
    (0..names.len())
        .map(|k| (start + k) % names.len())
        .collect()
}

#[cfg(test)]
mod tests {
    use pushwire_common::target::CONTROL_PLANE_PORT;

    use super::*;

    #[test]
    fn endpoint_takes_uris_only() {
        assert!(endpoint("http://127.0.0.1:1").is_ok());
        assert!(endpoint("not a uri").is_err());
    }

    #[test]
    fn rotation_starts_after_the_last_address_and_wraps() {
        let names = ["a", "b", "c"];
        assert_eq!(rotation(&names, None), [0, 1, 2]);
        assert_eq!(rotation(&names, Some("a")), [1, 2, 0]);
        assert_eq!(rotation(&names, Some("b")), [2, 0, 1]);
        assert_eq!(rotation(&names, Some("c")), [0, 1, 2]);
        // The last one is gone from the list (a re-resolved name): from the first.
        assert_eq!(rotation(&names, Some("z")), [0, 1, 2]);
        assert_eq!(rotation(&["only"], Some("only")), [0]);
        assert!(rotation::<&str>(&[], Some("a")).is_empty());
    }

    fn plain(target: &Target, addr: SocketAddr) -> Result<Endpoint, String> {
        endpoint(format!("{}://{addr}", target.scheme())).map_err(|e| e.to_string())
    }

    fn planes(entries: &[&str]) -> ControlPlanes {
        let targets = entries
            .iter()
            .map(|e| Target::parse(e, CONTROL_PLANE_PORT).unwrap())
            .collect();
        ControlPlanes::targets(targets, Bearer::none(), Box::new(plain))
    }

    #[tokio::test]
    async fn candidates_follow_the_list_and_drop_duplicates() {
        let p = planes(&[
            "http://127.0.0.1:7001",
            "127.0.0.2",
            "dns:///localhost:7003",
            "127.0.0.1:7001",
        ]);
        let names: Vec<_> = p.candidates().await.into_iter().map(|c| c.name).collect();
        assert_eq!(names[0], "127.0.0.1:7001");
        assert_eq!(names[1], "127.0.0.2:50051");
        assert!(names.len() >= 3, "{names:?}");
        assert!(
            names[2..]
                .iter()
                .all(|n| n.starts_with("localhost:7003 (") && n.ends_with(":7003)")),
            "{names:?}"
        );
        assert_eq!(
            names.iter().filter(|n| *n == "127.0.0.1:7001").count(),
            1,
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn calls_try_the_control_plane_in_use_first() {
        let p = planes(&["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]);
        let all = p.candidates().await;
        p.set_current(Some(all[1].clone()));
        let names: Vec<_> = p.for_call().await.into_iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            ["127.0.0.1:7002", "127.0.0.1:7001", "127.0.0.1:7003"]
        );
        p.set_current(None);
        assert_eq!(p.for_call().await[0].name, "127.0.0.1:7001");
    }
}
