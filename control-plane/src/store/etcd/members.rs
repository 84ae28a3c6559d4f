//! The etcd members and how a call picks one: one connection per member, calls sent to the
//! leader (else to the member that last answered), failover to another member within the
//! call's deadline, and a prober that finds the leader and takes a dead, frozen or leaderless
//! member out of rotation and puts it back once it answers again.
//!
//! Why not the etcd client's own endpoint list: it balances every call over all endpoints and
//! keeps a dead one in rotation, so with one member of three down about every third call
//! failed, and a call that never reached a member was not retried. Here a call goes to a member
//! believed up, and one that fails before reaching etcd is retried on the next member. What
//! may have reached etcd is retried only when it is a read: a write whose answer was lost may
//! have been applied ([`StoreError::OutcomeUnknown`]). Sending calls to the leader (where etcd
//! forwards every write anyway) means a follower that dies or hangs costs no call anything.

use std::error::Error as StdError;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Code;

use super::super::StoreError;

/// Bound on establishing a connection to a member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one attempt at one member: what a frozen member costs a call before the call
/// moves on (reads) or reports an unknown outcome (writes).
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a whole call across members.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(6);
/// How often every member is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on one probe; a member slower than this is out of rotation until it answers in time.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on open connections, so a silently dead connection ends its watches. etcd
/// refuses pings more often than every 5 s by default.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// No member, in [`Shared::leader`].
const UNKNOWN: usize = usize::MAX;

/// Whether a call changes the store: decides what a lost answer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Safe to send again to another member.
    Read,
    /// Sent again only when the first member certainly did not receive it.
    Write,
}

/// One member: its own connection, and whether it is in rotation.
struct Member {
    /// Its URL without credentials, for logs.
    endpoint: String,
    client: Client,
    up: AtomicBool,
    /// Cancelled when the member leaves rotation: ends the watches that run through it.
    tenure: Mutex<CancellationToken>,
}

impl Member {
    fn tenure(&self) -> CancellationToken {
        self.tenure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

struct Shared {
    members: Vec<Member>,
    /// The member tried first when the leader is unknown: the last one that answered.
    preferred: AtomicUsize,
    /// The member that leads the cluster, as the last probe found; [`UNKNOWN`] when none.
    leader: AtomicUsize,
    /// Counts the times a member came back into rotation; see [`Members::recovered`].
    recoveries: watch::Sender<u64>,
}

/// The members of one etcd cluster; cheap to clone. The prober stops when the last clone is
/// dropped.
#[derive(Clone)]
pub(super) struct Members {
    shared: Arc<Shared>,
    _prober: Arc<DropGuard>,
}

/// No member could take the call.
#[derive(Debug, thiserror::Error)]
#[error("no etcd member of {members} answered: {last}")]
struct NoMember {
    members: usize,
    last: String,
}

/// A member did not answer an attempt in time.
#[derive(Debug, thiserror::Error)]
#[error("{endpoint} did not answer within {timeout:?}")]
pub(super) struct NoAnswer {
    endpoint: String,
    timeout: Duration,
}

/// How one failed attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The request never reached etcd (no connection), or etcd refused it before acting on it
    /// (this member has no leader): nothing happened.
    NotSent,
    /// The request may have reached etcd; its answer was lost.
    Lost,
    /// etcd answered with an error about the request itself: another member says the same.
    Answered,
}

impl Members {
    /// Connections to every member of `endpoints` (opened on first use) and the prober.
    pub(super) async fn new(endpoints: &[String]) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(ATTEMPT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            // A member without a leader (cut off, or the cluster lost its quorum) refuses calls
            // at once and ends our watches, instead of taking writes it cannot commit or
            // keeping a watch that receives nothing.
            .with_require_leader(true);
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            // Connects lazily: a member that is down now does not stop the others.
            let client = Client::connect([endpoint], Some(options.clone()))
                .await
                .map_err(StoreError::unavailable)?;
            members.push(Member {
                endpoint: super::without_credentials(endpoint),
                client,
                up: AtomicBool::new(true),
                tenure: Mutex::new(CancellationToken::new()),
            });
        }
        if members.is_empty() {
            return Err(StoreError::unavailable(NoMember {
                members: 0,
                last: "no endpoints given".to_owned(),
            }));
        }
        let shared = Arc::new(Shared {
            members,
            preferred: AtomicUsize::new(0),
            leader: AtomicUsize::new(UNKNOWN),
            recoveries: watch::channel(0).0,
        });
        let stop = CancellationToken::new();
        tokio::spawn(probe(shared.clone(), stop.clone()));
        Ok(Self {
            shared,
            _prober: Arc::new(stop.drop_guard()),
        })
    }

    /// The endpoints, without credentials.
    pub(super) fn endpoints(&self) -> Vec<String> {
        let members = &self.shared.members;
        members.iter().map(|m| m.endpoint.clone()).collect()
    }

    /// Runs `call` on a member that is up, moving to the next member when an attempt fails
    /// without effect (any failure, for reads), for at most [`CALL_TIMEOUT`] overall. `call`
    /// gets the member's client and the member's tenure (cancelled when it leaves rotation).
    pub(super) async fn call<T, F, Fut>(&self, kind: Kind, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client, CancellationToken) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let mut last: Option<StoreError> = None;
        for index in self.order() {
            let member = &self.shared.members[index];
            let budget = deadline
                .saturating_duration_since(Instant::now())
                .min(ATTEMPT_TIMEOUT);
            if budget.is_zero() {
                break;
            }
            let attempt =
                tokio::time::timeout(budget, call(member.client.clone(), member.tenure()));
            let error = match attempt.await {
                Ok(Ok(value)) => {
                    self.shared.preferred.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Ok(Err(error)) => error,
                Err(_) => StoreError::unavailable(NoAnswer {
                    endpoint: member.endpoint.clone(),
                    timeout: budget,
                }),
            };
            let failure = classify(&error);
            if failure == Failure::Answered {
                return Err(error);
            }
            leave_rotation(&self.shared, index, &error);
            if failure == Failure::Lost && kind == Kind::Write {
                return Err(StoreError::OutcomeUnknown(Box::new(error)));
            }
            last = Some(error);
        }
        Err(StoreError::unavailable(NoMember {
            members: self.shared.members.len(),
            last: last.map_or_else(
                || format!("no answer within {CALL_TIMEOUT:?}"),
                |e| chain(&e),
            ),
        }))
    }

    /// Waits until a member comes back into rotation; for loops that back off while the
    /// cluster is unreachable.
    pub(super) async fn recovered(&self) {
        let mut rx = self.shared.recoveries.subscribe();
        // Only an error: the sender lives as long as `self`.
        let _ = rx.changed().await;
    }

    /// Members to try, in order: the leader, then the preferred member, then the others, of
    /// those in rotation; when none is, only the preferred one (the prober may not have seen
    /// the cluster come back yet; trying every member would cost a timeout each if they hang).
    fn order(&self) -> Vec<usize> {
        let members = &self.shared.members;
        let n = members.len();
        let preferred = self.shared.preferred.load(Ordering::Relaxed) % n;
        let leader = self.shared.leader.load(Ordering::Relaxed);
        let ring = (0..n).map(|i| (preferred + i) % n);
        let mut order: Vec<usize> = std::iter::once(leader)
            .filter(|&l| l < n)
            .chain(ring.filter(|&i| i != leader))
            .filter(|&i| members[i].up.load(Ordering::Relaxed))
            .collect();
        if order.is_empty() {
            order.push(preferred);
        }
        order
    }
}

/// Takes member `index` out of rotation after `error`, ending the watches through it.
fn leave_rotation(shared: &Shared, index: usize, error: &StoreError) {
    let member = &shared.members[index];
    if member.up.swap(false, Ordering::Relaxed) {
        member.tenure().cancel();
        tracing::warn!(
            member = %member.endpoint,
            error = %chain(error),
            "etcd member out of rotation; calls go to the other members until it answers again"
        );
    }
}

/// Puts member `index` back into rotation.
fn rejoin(shared: &Shared, index: usize) {
    let member = &shared.members[index];
    if !member.up.load(Ordering::Relaxed) {
        *member.tenure.lock().unwrap_or_else(|e| e.into_inner()) = CancellationToken::new();
        member.up.store(true, Ordering::Relaxed);
        shared.recoveries.send_modify(|n| *n += 1);
        tracing::info!(member = %member.endpoint, "etcd member answers again; back in rotation");
    }
}

/// Probes every member each [`PROBE_INTERVAL`] until `stop`: its status, answered within
/// [`PROBE_TIMEOUT`] and naming a leader, keeps or brings a member into rotation; anything else
/// takes it out. The leader the members name is where calls go first.
async fn probe(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let probes = shared.members.iter().map(|member| {
            let mut client = member.client.clone();
            async move {
                match tokio::time::timeout(PROBE_TIMEOUT, client.status()).await {
                    Ok(Ok(status)) if status.leader() != 0 => {
                        let id = status.header().map_or(0, |h| h.member_id());
                        Ok((id, status.leader()))
                    }
                    Ok(Ok(_)) => Err(StoreError::unavailable(NoLeader)),
                    Ok(Err(e)) => Err(StoreError::unavailable(e)),
                    Err(_) => Err(StoreError::unavailable(NoAnswer {
                        endpoint: member.endpoint.clone(),
                        timeout: PROBE_TIMEOUT,
                    })),
                }
            }
        });
        let results = tokio::select! {
            r = futures_util::future::join_all(probes) => r,
            () = stop.cancelled() => return,
        };
        for (index, result) in results.iter().enumerate() {
            match result {
                Ok(_) => rejoin(&shared, index),
                Err(e) => leave_rotation(&shared, index, e),
            }
        }
        // The member whose id the members name as their leader.
        let named = results.iter().flatten().map(|&(_, leader)| leader).next();
        let leader = named
            .and_then(|l| {
                results
                    .iter()
                    .position(|r| matches!(r, Ok((id, _)) if *id == l))
            })
            .unwrap_or(UNKNOWN);
        shared.leader.store(leader, Ordering::Relaxed);
    }
}

/// A member answered that it knows no leader.
#[derive(Debug, thiserror::Error)]
#[error("the member knows no leader")]
struct NoLeader;

/// What a failed attempt means for the call.
fn classify(error: &StoreError) -> Failure {
    let StoreError::Unavailable(source) = error else {
        return Failure::Answered;
    };
    if source.is::<NoAnswer>() {
        return Failure::Lost;
    }
    let Some(etcd) = source.downcast_ref::<etcd_client::Error>() else {
        return Failure::Lost;
    };
    match etcd {
        etcd_client::Error::GRpcStatus(status) => classify_status(status),
        etcd_client::Error::TransportError(_) => Failure::NotSent,
        // Watch-stream bookkeeping and the like: nothing was written.
        _ => Failure::Lost,
    }
}

fn classify_status(status: &tonic::Status) -> Failure {
    let message = status.message();
    match status.code() {
        // etcd's refusals before proposing anything (require-leader, a learner, a member
        // being removed), and connections that could not be made at all.
        Code::Unavailable
            if message.contains("no leader")
                || message.contains("not capable")
                || never_connected(status) =>
        {
            Failure::NotSent
        }
        // Lost connections, "request timed out", "leader changed": etcd may have acted.
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted => Failure::Lost,
        _ => Failure::Answered,
    }
}

/// Whether the status comes from failing to open a connection (refused, unreachable, timed
/// out while connecting), as opposed to losing one with a request on it.
fn never_connected(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused | AddrNotAvailable | HostUnreachable | NetworkUnreachable
            ) {
                return true;
            }
        }
        let text = e.to_string();
        if text.contains("tcp connect error") || text.contains("error trying to connect") {
            return true;
        }
        source = e.source();
    }
    false
}

/// An error and its causes on one line, for logs.
pub(super) fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}
