//! The `WatchConfig` client: keeps the worker's [`RoutingTable`] in step with the control plane
//! (DESIGN §5). Owns the stream, the failover between control planes and the revision
//! bookkeeping, and publishes every new table through a `watch` channel (one atomic swap per
//! message). It never touches delivery, keeps serving the last table while the control planes
//! are away, records how current the table is ([`WatchHealth`]: every snapshot, change or
//! progress message confirms it), and never logs secrets (only names, revisions and counts).
//!
//! Decoding: each message is decoded here into domain values ([`Snapshot`], [`Change`]), so
//! the router never sees a protobuf type. A change that does not decode drops the stream and re-syncs from a fresh
//! snapshot (`from_revision` 0) instead of skipping it, since a skipped change (say, a new
//! `DO_NOT_PUSH` scope) would leave the worker routing on a configuration that never existed,
//! silently and until the next restart. Until the re-sync succeeds the last good table stays.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use pb::config_change::Change as WireChange;
use pb::config_service_client::ConfigServiceClient;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use pushwire_common::backoff::Backoff;
use pushwire_common::domain::convert::InvalidField;
use pushwire_common::domain::{Integration, IntegrationName, PushScope, PushScopeName};
use pushwire_common::pb::v1 as pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::control_plane::endpoint;
use crate::control_plane::{Candidate, ControlPlaneChannel, ControlPlanes, rotation};
use crate::router::{Change, RoutingTable, Snapshot, TableBuilder};

/// Largest `WatchConfig` message accepted by default: snapshots of big installations are
/// large, and tonic's 4 MiB default would cut them off.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// A stream that stayed up this long is considered healthy even if it carried nothing, so the
/// next reconnect starts again from the shortest delay.
const STABLE_STREAM: Duration = Duration::from_secs(10);

/// A session whose control plane sent progress messages and then nothing for this long is
/// dropped for the next control plane: that one stopped confirming its configuration is
/// current (its store watch is down, or it hangs). Three of the control plane's default
/// progress intervals.
pub const DEFAULT_SILENCE: Duration = Duration::from_secs(15);

/// Staleness (time since the configuration was last confirmed current) past which the worker
/// logs a warning, by default (`--config-stale-after`).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30);

/// Settings of the watch loop.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Largest message accepted (snapshots can be large).
    pub max_message_size: usize,
    /// First delay after a whole cycle of control planes failed.
    pub backoff_initial: Duration,
    /// Longest delay between cycles.
    pub backoff_max: Duration,
    /// See [`DEFAULT_SILENCE`].
    pub silence: Duration,
    /// Time without confirmation after which a warning is logged ([`DEFAULT_STALE_AFTER`]).
    pub stale_after: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            silence: DEFAULT_SILENCE,
            stale_after: DEFAULT_STALE_AFTER,
        }
    }
}

/// The routing table of the moment, as the watch publishes it; `None` until the first
/// snapshot.
pub type TableWatch = watch::Receiver<Option<Arc<RoutingTable>>>;

/// How current the configuration is: when a control plane last confirmed it (a snapshot, a
/// change or a progress message), through which control plane, and how many snapshots were
/// applied. Shared by the watch (which records), `/metrics` and `/readyz` (which read).
#[derive(Debug)]
pub struct WatchHealth {
    started: Instant,
    confirmed: Mutex<Option<Instant>>,
    control_plane: Mutex<Option<String>>,
    snapshots: Counter,
    revision: Gauge,
    updates: Counter,
    propagation_lag: Option<Histogram>,
}

impl Default for WatchHealth {
    fn default() -> Self {
        Self::new(Counter::default())
    }
}

impl WatchHealth {
    /// Nothing confirmed yet; snapshots counted on `snapshots`.
    pub fn new(snapshots: Counter) -> Self {
        Self {
            started: Instant::now(),
            confirmed: Mutex::new(None),
            control_plane: Mutex::new(None),
            snapshots,
            revision: Gauge::default(),
            updates: Counter::default(),
            propagation_lag: None,
        }
    }

    /// Also records each new table's revision on `revision`, counts on `updates` the tables
    /// built from changes, and records on `propagation_lag` how long after its write each
    /// change arrived.
    pub fn with_table_metrics(
        self,
        revision: Gauge,
        updates: Counter,
        propagation_lag: Histogram,
    ) -> Self {
        Self {
            revision,
            updates,
            propagation_lag: Some(propagation_lag),
            ..self
        }
    }

    /// Records `table`, about to be published, and when each change that made it was
    /// written (in the watch task itself: one more task woken per change would cost more
    /// than this).
    fn publishing(&self, table: &RoutingTable, written: &[SystemTime]) {
        self.revision.set(table.revision());
        let Some(histogram) = &self.propagation_lag else {
            return;
        };
        let now = SystemTime::now();
        for at in written {
            // A write stamped after now (the clocks disagree) has no lag to tell.
            if let Ok(lag) = now.duration_since(*at) {
                histogram.observe(lag.as_secs_f64());
            }
        }
    }

    /// Time since the configuration was last confirmed current (since the start while it
    /// never was).
    pub fn staleness(&self) -> Duration {
        let confirmed = *self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        confirmed.unwrap_or(self.started).elapsed()
    }

    /// Whether a control plane ever confirmed the configuration.
    pub fn ever_confirmed(&self) -> bool {
        self.confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The control plane the watch uses or last tried (a name for logs, no secrets).
    pub fn control_plane(&self) -> Option<String> {
        self.control_plane
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Snapshots applied since the start (a resumed stream applies none).
    pub fn snapshots(&self) -> u64 {
        self.snapshots.get()
    }

    fn confirm(&self) {
        *self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    fn using(&self, name: &str) {
        *self
            .control_plane
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(name.to_owned());
    }
}

/// Logs a warning once when the configuration was not confirmed current for `threshold`
/// (naming the control plane in use), and an info line when it is again; until `stop`.
pub async fn log_staleness(health: Arc<WatchHealth>, threshold: Duration, stop: CancellationToken) {
    let period = (threshold / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut warned = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
        let staleness = health.staleness();
        let control_plane = health.control_plane().unwrap_or_else(|| "none".into());
        if !warned && staleness >= threshold {
            warned = true;
            tracing::warn!(
                staleness_seconds = staleness.as_secs(),
                %control_plane,
                "config watch: the configuration was not confirmed current for {}s (no control \
                 plane reachable and current); still routing with the last one",
                staleness.as_secs()
            );
        } else if warned && staleness < threshold {
            warned = false;
            tracing::info!(
                %control_plane,
                "config watch: the configuration is confirmed current again"
            );
        }
    }
}

/// Watches the configuration through `channel` until `shutdown`, with the default options.
/// See [`run_with`].
pub async fn run(
    channel: ControlPlaneChannel,
    table: watch::Sender<Option<Arc<RoutingTable>>>,
    shutdown: CancellationToken,
) {
    run_with(
        ControlPlanes::fixed(channel, "control plane"),
        table,
        Arc::default(),
        shutdown,
        WatchOptions::default(),
    )
    .await;
}

/// Watches the configuration from the control planes of `planes` (their
/// [`Bearer`](pushwire_common::auth::Bearer) a `worker` token) until `shutdown`, publishing
/// each new table on `table`; `None` there means no snapshot has been applied yet (not
/// ready). Asks from the revision of the table it has (0 for none).
///
/// One control plane at a time: when its session fails or its stream ends, the next one in
/// [`rotation`] order is tried at once, resuming from the table's revision (the control
/// plane's feed sends the changes after it, or a snapshot when they are no longer in its
/// history); only after a whole cycle of them failed does it wait, with a jittered backoff,
/// before resolving the addresses again. The table is kept meanwhile. Records in `health`
/// every confirmation that the table is current and the control plane in use, which
/// `planes` also shares with the 410 consumer.
pub async fn run_with(
    planes: ControlPlanes,
    table: watch::Sender<Option<Arc<RoutingTable>>>,
    health: Arc<WatchHealth>,
    shutdown: CancellationToken,
    opts: WatchOptions,
) {
    let mut backoff = Backoff::new(opts.backoff_initial, opts.backoff_max);
    let mut resync = false;
    let mut last: Option<String> = None;
    'cycles: while !shutdown.is_cancelled() {
        let candidates = tokio::select! {
            c = planes.candidates() => c,
            () = shutdown.cancelled() => break,
        };
        let names: Vec<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
        let order = rotation(&names, last.as_deref());
        let mut healthy = false;
        for (tried, i) in order.iter().enumerate() {
            let candidate = &candidates[*i];
            if tried > 0 && healthy {
                break;
            }
            last = Some(candidate.name.clone());
            health.using(&candidate.name);
            let current = table.borrow().as_ref().map(|t| t.revision());
            let from = if resync { 0 } else { current.unwrap_or(0) };
            let started = Instant::now();
            let mut session = Session {
                table: &table,
                health: &health,
                planes: &planes,
                candidate,
                received: false,
                resync: &mut resync,
                silence: opts.silence,
            };
            let error = tokio::select! {
                e = session.follow(opts.max_message_size, from) => e,
                () = shutdown.cancelled() => break 'cycles,
            };
            planes.set_current(None);
            if session.received || started.elapsed() >= STABLE_STREAM {
                healthy = true;
                backoff.reset();
            }
            report(&error, &candidate.name, from, &mut resync);
        }
        // A session that worked and ended moves to the next control plane at once (a new
        // cycle, names resolved again); a cycle where none worked waits. So does a single
        // control plane, not to spin on one that keeps ending its streams.
        if healthy && candidates.len() > 1 {
            continue;
        }
        let delay = backoff.next_delay();
        if !healthy {
            // Each failure was logged above; staleness is warned about once (log_staleness).
            tracing::info!(
                control_planes = candidates.len(),
                retry_in = ?delay,
                "config watch: no control plane reachable; keeping the last table"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => break,
        }
    }
    planes.set_current(None);
    tracing::debug!("config watch stopped");
}

/// Logs why a session with `control_plane` ended, and sets `resync` when the next one must
/// start from a snapshot.
fn report(error: &SessionError, control_plane: &str, from: i64, resync: &mut bool) {
    match error {
        SessionError::Decode { revision, source } => {
            *resync = true;
            tracing::error!(
                revision,
                control_plane,
                field = %source.field,
                reason = %source.reason,
                "config watch: message does not decode; re-syncing from a snapshot, \
                 keeping the last table meanwhile"
            );
        }
        SessionError::NoBaseline { revision } => {
            *resync = true;
            tracing::error!(
                revision,
                control_plane,
                "config watch: changes before any snapshot; re-syncing from a snapshot"
            );
        }
        SessionError::Rpc(status)
            if matches!(
                status.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) =>
        {
            tracing::error!(
                code = ?status.code(),
                message = status.message(),
                control_plane,
                "config watch: the control plane refused this worker's credentials \
                 (--control-plane-token-file must hold a worker token)"
            )
        }
        SessionError::Rpc(status) => tracing::warn!(
            code = ?status.code(),
            message = status.message(),
            control_plane,
            from,
            "config watch: stream failed; trying the next control plane, keeping the last table"
        ),
        SessionError::Ended => tracing::info!(
            from,
            control_plane,
            "config watch: stream ended; trying the next control plane"
        ),
        SessionError::Parts { revision, why } => tracing::error!(
            revision,
            why,
            control_plane,
            "config watch: a snapshot in parts broke off; reconnecting, keeping the last table"
        ),
        SessionError::Silent(silence) => tracing::warn!(
            from,
            control_plane,
            ?silence,
            "config watch: the control plane stopped confirming the configuration is current; \
             trying the next one"
        ),
    }
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("WatchConfig failed")]
    Rpc(#[source] tonic::Status),
    #[error("the control plane ended the stream")]
    Ended,
    #[error("message at revision {revision} does not decode")]
    Decode {
        revision: i64,
        #[source]
        source: InvalidField,
    },
    #[error("changes at revision {revision} came before any snapshot")]
    NoBaseline { revision: i64 },
    #[error("snapshot in parts at revision {revision} broken off: {why}")]
    Parts { revision: i64, why: &'static str },
    #[error("no message for {0:?} after progress messages")]
    Silent(Duration),
}

/// What one message does to the current table.
#[derive(Debug)]
enum Step {
    /// Publish this table, made by changes written at `written` (empty for a snapshot, and
    /// deletions carry no time).
    Swap {
        table: Arc<RoutingTable>,
        written: Vec<SystemTime>,
    },
    /// Already applied (a revision not newer than ours).
    Ignore,
}

/// Applies one `WatchConfig` message to `current`. A snapshot always replaces the table, even
/// at an older revision: the control plane only sends one older than ours when its store is
/// behind us (a lagging replica, which catches up within moments, or a store restored from a
/// backup, where refusing it would wedge the worker on a history that no longer exists).
/// Changes not newer than our revision were already applied and are ignored (not decoded).
fn step(
    current: Option<&RoutingTable>,
    msg: pb::WatchConfigResponse,
) -> Result<Step, SessionError> {
    let revision = msg.revision;
    let decode = |source| SessionError::Decode { revision, source };
    if let Some(snapshot) = msg.snapshot {
        let snapshot = decode_snapshot(snapshot).map_err(decode)?;
        let changes = decode_changes(msg.changes).map_err(decode)?;
        let mut fresh = RoutingTable::from_snapshot(revision, snapshot);
        if !changes.is_empty() {
            // Not sent by the control plane; the changes of revision R are part of the
            // snapshot at R, so applying them again is harmless.
            fresh = fresh.apply(revision, changes);
        }
        return Ok(Step::Swap {
            table: Arc::new(fresh),
            written: Vec::new(),
        });
    }
    let Some(current) = current else {
        return Err(SessionError::NoBaseline { revision });
    };
    if revision <= current.revision() {
        return Ok(Step::Ignore);
    }
    let changes = decode_changes(msg.changes).map_err(decode)?;
    let written = changes.iter().filter_map(Change::written).collect();
    Ok(Step::Swap {
        table: Arc::new(current.apply(revision, changes)),
        written,
    })
}

/// A snapshot arriving in parts (`snapshot_continues`), decoded and grouped so far.
struct Assembly {
    revision: i64,
    table: TableBuilder,
}

/// Takes one part of a snapshot sent in parts (decoded and grouped by account at once, while
/// the control plane sends the next); the table once its last part came. A part at another
/// revision, or a message that is not a part, breaks the sequence: the stream is dropped and
/// the worker re-syncs (its table stays meanwhile).
fn assemble(
    assembly: &mut Option<Assembly>,
    msg: pb::WatchConfigResponse,
) -> Result<Option<RoutingTable>, SessionError> {
    let revision = msg.revision;
    let broken = |why| SessionError::Parts { revision, why };
    let Some(part) = msg.snapshot else {
        return Err(broken(
            "a message that is not part of the snapshot in progress",
        ));
    };
    if !msg.changes.is_empty() {
        return Err(broken("changes in a snapshot part"));
    }
    let part = decode_snapshot(part).map_err(|source| SessionError::Decode { revision, source })?;
    let a = assembly.get_or_insert_with(|| Assembly {
        revision,
        table: TableBuilder::default(),
    });
    if a.revision != revision {
        return Err(broken("a part at another revision"));
    }
    a.table.add(part);
    if msg.snapshot_continues {
        return Ok(None);
    }
    Ok(assembly.take().map(|a| a.table.finish(revision)))
}

/// Decodes a snapshot. Any field that does not decode fails the whole snapshot: routing on
/// part of a configuration could skip an exclusion.
fn decode_snapshot(snapshot: pb::ConfigSnapshot) -> Result<Snapshot, InvalidField> {
    let integrations = snapshot
        .integrations
        .into_iter()
        .enumerate()
        .map(|(n, config)| {
            Integration::try_from(config)
                .map_err(within(|| format!("snapshot.integrations[{n}]"), ""))
        })
        .collect::<Result<_, _>>()?;
    let push_scopes = snapshot
        .push_scopes
        .into_iter()
        .enumerate()
        .map(|(n, scope)| {
            PushScope::try_from(scope).map_err(within(
                || format!("snapshot.push_scopes[{n}]"),
                "push_scope.",
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(Snapshot {
        integrations,
        push_scopes,
    })
}

/// Decodes the changes of one message, in order; one that does not decode fails them all, so
/// a batch (one store transaction) is applied whole or not at all.
fn decode_changes(changes: Vec<pb::ConfigChange>) -> Result<Vec<Change>, InvalidField> {
    changes
        .into_iter()
        .enumerate()
        .map(|(n, change)| decode_change(n, change))
        .collect()
}

/// Decodes the `n`th change of a message.
fn decode_change(n: usize, change: pb::ConfigChange) -> Result<Change, InvalidField> {
    let bad =
        |field: &str, reason: String| InvalidField::new(format!("changes[{n}].{field}"), reason);
    Ok(match change.change {
        Some(WireChange::UpsertIntegration(config)) => Change::UpsertIntegration(
            Integration::try_from(config)
                .map_err(within(|| format!("changes[{n}].upsert_integration"), ""))?,
        ),
        Some(WireChange::DeleteIntegration(name)) => Change::DeleteIntegration(
            IntegrationName::parse(&name).map_err(|e| bad("delete_integration", e.to_string()))?,
        ),
        Some(WireChange::UpsertPushScope(scope)) => {
            Change::UpsertPushScope(PushScope::try_from(scope).map_err(within(
                || format!("changes[{n}].upsert_push_scope"),
                "push_scope.",
            ))?)
        }
        Some(WireChange::DeletePushScope(name)) => Change::DeletePushScope(
            PushScopeName::parse(&name).map_err(|e| bad("delete_push_scope", e.to_string()))?,
        ),
        // An empty oneof, or a kind of change this worker does not know (a newer control
        // plane): refuse rather than silently diverge.
        None => return Err(bad("change", "missing or of an unknown kind".into())),
    })
}

/// Rewrites a decoding error's field path to its place in the `WatchConfig` message: `path`
/// replaces the `own` prefix the conversion uses (`push_scope.` for scopes, none for
/// integration configs), so errors read `changes[3].upsert_push_scope.level`. The path is
/// written out only for an error.
fn within(
    path: impl FnOnce() -> String,
    own: &'static str,
) -> impl FnOnce(InvalidField) -> InvalidField {
    move |e| {
        let rest = e.field.strip_prefix(own).unwrap_or(&e.field);
        let path = path();
        let field = if rest.is_empty() {
            path
        } else {
            format!("{path}.{rest}")
        };
        InvalidField {
            field,
            reason: e.reason,
        }
    }
}

/// Starts [`run_with`] on a thread of its own (`config-watch`) with a single-threaded
/// runtime, and returns what waits for it to end.
///
/// Decoding and applying a large snapshot (seconds of CPU at a million integrations) then
/// never holds a thread that streams and deliveries need. The connections the watch opens
/// (`ControlPlanes::targets`) are driven on that thread too, so a change wakes that one
/// thread; channels given ready-made (`ControlPlanes::channels`) stay on the runtime that
/// made them.
pub fn run_on_own_thread(
    planes: ControlPlanes,
    table: watch::Sender<Option<Arc<RoutingTable>>>,
    health: Arc<WatchHealth>,
    shutdown: CancellationToken,
    opts: WatchOptions,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            runtime.block_on(run_with(planes, table, health, shutdown, opts));
            // Connections and name lookups still going are dropped, not waited for.
            runtime.shutdown_timeout(Duration::from_secs(1));
            drop(done);
        })?;
    Ok(async move {
        let _ = ended.await;
    })
}

/// One `WatchConfig` stream.
struct Session<'a> {
    table: &'a watch::Sender<Option<Arc<RoutingTable>>>,
    health: &'a WatchHealth,
    planes: &'a ControlPlanes,
    candidate: &'a Candidate,
    /// Whether a message came (the stream was useful: reset the backoff).
    received: bool,
    resync: &'a mut bool,
    silence: Duration,
}

impl Session<'_> {
    /// Follows one stream from `from` until it fails or ends; returns why.
    async fn follow(&mut self, max_message_size: usize, from: i64) -> SessionError {
        let mut client = ConfigServiceClient::new(self.candidate.channel.clone())
            .max_decoding_message_size(max_message_size);
        let mut stream = match client
            .watch_config(pb::WatchConfigRequest {
                from_revision: from,
                // Snapshots larger than this come in parts, each well within it.
                max_message_bytes: i64::try_from(max_message_size).unwrap_or(i64::MAX),
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return SessionError::Rpc(status),
        };
        tracing::info!(from, control_plane = %self.candidate.name, "config watch: stream open");
        self.planes.set_current(Some(self.candidate.clone()));
        // Whether this control plane sends progress messages (older ones do not): from then
        // on, a silence means it stopped confirming.
        let mut progress_seen = false;
        // A snapshot arriving in parts.
        let mut assembly: Option<Assembly> = None;
        loop {
            let next = stream.message();
            let next = if progress_seen {
                match tokio::time::timeout(self.silence, next).await {
                    Ok(next) => next,
                    Err(_) => return SessionError::Silent(self.silence),
                }
            } else {
                next.await
            };
            let msg = match next {
                Ok(Some(msg)) => msg,
                Ok(None) => return SessionError::Ended,
                Err(status) => return SessionError::Rpc(status),
            };
            let revision = msg.revision;
            let is_snapshot = msg.snapshot.is_some();
            let changes = msg.changes.len();
            let current = self.table.borrow().clone();
            if !is_snapshot && changes == 0 {
                progress_seen = true;
            }
            // A snapshot in parts is decoded as the parts come and applied with the last.
            let stepped = if msg.snapshot_continues || assembly.is_some() {
                match assemble(&mut assembly, msg) {
                    Ok(None) => {
                        self.received = true;
                        continue;
                    }
                    Ok(Some(table)) => Ok(Step::Swap {
                        table: Arc::new(table),
                        written: Vec::new(),
                    }),
                    Err(e) => return e,
                }
            } else {
                step(current.as_deref(), msg)
            };
            let (next, written) = match stepped {
                Ok(Step::Swap { table, written }) => (table, written),
                Ok(Step::Ignore) => {
                    // A progress message, or changes already applied: either way the control
                    // plane confirms the table is current.
                    if current.is_some() {
                        self.health.confirm();
                    }
                    self.received = true;
                    tracing::trace!(revision, "config watch: current");
                    continue;
                }
                Err(e) => return e,
            };
            if is_snapshot {
                *self.resync = false;
                self.health.snapshots.inc();
                let previous = current.as_ref().map(|t| t.revision());
                if previous.is_some_and(|p| revision < p) {
                    tracing::warn!(
                        revision,
                        ?previous,
                        "config watch: snapshot older than our table; taking it"
                    );
                }
                tracing::info!(
                    revision,
                    integrations = next.integration_count(),
                    push_scopes = next.push_scope_count(),
                    control_plane = %self.candidate.name,
                    "config watch: snapshot applied"
                );
            } else {
                self.health.updates.inc();
                tracing::debug!(revision, changes, "config watch: changes applied");
            }
            self.health.publishing(&next, &written);
            self.table.send_replace(Some(next));
            self.health.confirm();
            self.received = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use pushwire_common::domain::convert::integration_config;
    use pushwire_common::domain::{AccountName, PushAction, ScopeTarget};

    use super::*;

    fn integration(id: &str) -> Integration {
        Integration::example("acme", id)
    }

    fn scope(id: &str, integration: &str) -> PushScope {
        let acme = AccountName::from_id("acme").unwrap();
        PushScope {
            name: PushScopeName::new(&acme, id).unwrap(),
            integration: IntegrationName::new(&acme, integration).unwrap(),
            target: ScopeTarget::Website("7".into()),
            audience: Default::default(),
            action: PushAction::DoNotPush,
            create_time: SystemTime::UNIX_EPOCH,
            update_time: SystemTime::UNIX_EPOCH,
            revision: 3,
        }
    }

    fn wire(change: WireChange) -> pb::ConfigChange {
        pb::ConfigChange {
            change: Some(change),
        }
    }

    fn snapshot_msg(revision: i64, ids: &[&str]) -> pb::WatchConfigResponse {
        pb::WatchConfigResponse {
            revision,
            snapshot: Some(pb::ConfigSnapshot {
                integrations: ids
                    .iter()
                    .map(|id| integration_config(&integration(id)))
                    .collect(),
                push_scopes: Vec::new(),
            }),
            ..Default::default()
        }
    }

    fn part(revision: i64, ids: &[&str], continues: bool) -> pb::WatchConfigResponse {
        pb::WatchConfigResponse {
            snapshot_continues: continues,
            ..snapshot_msg(revision, ids)
        }
    }

    #[test]
    fn a_snapshot_in_parts_is_whole_only_with_its_last_part() {
        let mut assembly = None;
        assert!(matches!(
            assemble(&mut assembly, part(7, &["a", "b"], true)),
            Ok(None)
        ));
        assert!(matches!(
            assemble(&mut assembly, part(7, &["c"], true)),
            Ok(None)
        ));
        let whole = assemble(&mut assembly, part(7, &["d"], false))
            .unwrap()
            .unwrap();
        assert_eq!((whole.revision(), whole.integration_count()), (7, 4));
        assert!(["a", "b", "c", "d"].iter().all(|id| has(&whole, id)));
        assert!(assembly.is_none());

        // Broken sequences: a part at another revision, or changes in the middle.
        assert!(matches!(
            assemble(&mut assembly, part(7, &["a"], true)),
            Ok(None)
        ));
        assert!(matches!(
            assemble(&mut assembly, part(8, &["b"], false)),
            Err(SessionError::Parts { .. })
        ));
        let mut assembly = None;
        assert!(matches!(
            assemble(&mut assembly, part(7, &["a"], true)),
            Ok(None)
        ));
        assert!(matches!(
            assemble(&mut assembly, upsert_msg(8, "b")),
            Err(SessionError::Parts { .. })
        ));
    }

    fn upsert_msg(revision: i64, id: &str) -> pb::WatchConfigResponse {
        pb::WatchConfigResponse {
            revision,
            snapshot: None,
            changes: vec![pb::ConfigChange {
                change: Some(WireChange::UpsertIntegration(integration_config(
                    &integration(id),
                ))),
            }],
            ..Default::default()
        }
    }

    fn swapped(step: Result<Step, SessionError>) -> Arc<RoutingTable> {
        match step {
            Ok(Step::Swap { table, .. }) => table,
            other => panic!("expected a new table, got {other:?}"),
        }
    }

    /// The table once it is at `revision` (within 5 s).
    async fn table_at(
        rx: &mut watch::Receiver<Option<Arc<RoutingTable>>>,
        revision: i64,
    ) -> Arc<RoutingTable> {
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|t| t.as_ref().is_some_and(|t| t.revision() == revision)),
        )
        .await
        .unwrap_or_else(|_| panic!("the table at revision {revision} within 5 s"))
        .unwrap()
        .clone()
        .unwrap()
    }

    fn has(t: &RoutingTable, id: &str) -> bool {
        t.integration(&integration(id).name).is_some()
    }

    #[test]
    fn snapshot_then_newer_changes_apply_and_stale_ones_are_ignored() {
        let t1 = swapped(step(None, snapshot_msg(5, &["a"])));
        assert_eq!(t1.revision(), 5);
        let t2 = swapped(step(Some(&t1), upsert_msg(7, "b")));
        assert_eq!(t2.revision(), 7);
        assert!(has(&t2, "a") && has(&t2, "b"));
        for stale in [5, 7, 3] {
            assert!(
                matches!(step(Some(&t2), upsert_msg(stale, "c")), Ok(Step::Ignore)),
                "{stale}"
            );
        }
    }

    #[test]
    fn a_snapshot_replaces_whatever_the_table_had_even_an_older_one() {
        let t1 = swapped(step(None, snapshot_msg(9, &["a", "b"])));
        let t2 = swapped(step(Some(&t1), snapshot_msg(4, &["c"])));
        assert_eq!(t2.revision(), 4);
        assert!(!has(&t2, "a") && has(&t2, "c"));
    }

    #[test]
    fn changes_without_a_baseline_and_undecodable_messages_are_errors() {
        assert!(matches!(
            step(None, upsert_msg(3, "a")),
            Err(SessionError::NoBaseline { revision: 3 })
        ));
        let t1 = swapped(step(None, snapshot_msg(5, &["a"])));
        let mut bad = upsert_msg(6, "b");
        bad.changes.push(pb::ConfigChange {
            change: Some(WireChange::DeleteIntegration("garbage".into())),
        });
        match step(Some(&t1), bad) {
            Err(SessionError::Decode {
                revision: 6,
                source,
            }) => assert_eq!(source.field, "changes[1].delete_integration"),
            other => panic!("expected a decode error, got {other:?}"),
        }
        let mut bad_snapshot = snapshot_msg(8, &["a"]);
        if let Some(s) = bad_snapshot.snapshot.as_mut() {
            s.integrations[0].integration = None;
        }
        assert!(matches!(
            step(Some(&t1), bad_snapshot),
            Err(SessionError::Decode { revision: 8, .. })
        ));
    }

    /// A message of several changes makes one table, and each change it wrote is timed on
    /// its own (the propagation lag of a burst is every change's, not its newest's).
    #[test]
    fn a_table_from_changes_carries_when_each_was_written() {
        let t1 = swapped(step(None, snapshot_msg(5, &["a"])));
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let crm = Integration {
            update_time: at(100),
            ..integration("crm")
        };
        let web = PushScope {
            update_time: at(90),
            ..scope("web", "crm")
        };
        let msg = pb::WatchConfigResponse {
            revision: 6,
            changes: vec![
                wire(WireChange::UpsertIntegration(integration_config(&crm))),
                wire(WireChange::DeleteIntegration(
                    integration("a").name.to_string(),
                )),
                wire(WireChange::UpsertPushScope(pb::PushScope::from(&web))),
            ],
            ..Default::default()
        };
        match step(Some(&t1), msg) {
            Ok(Step::Swap { table, written }) => {
                assert_eq!(written, [at(100), at(90)]);
                assert!(has(&table, "crm") && !has(&table, "a"));
            }
            other => panic!("expected a new table, got {other:?}"),
        }
        // A snapshot is no write of its own.
        match step(Some(&t1), snapshot_msg(7, &["b"])) {
            Ok(Step::Swap { written, .. }) => assert!(written.is_empty()),
            other => panic!("expected a new table, got {other:?}"),
        }
    }

    #[test]
    fn changes_decode_into_domain_changes_in_order() {
        let crm = integration("crm");
        let web = scope("web", "crm");
        let decoded = decode_changes(vec![
            wire(WireChange::UpsertIntegration(integration_config(&crm))),
            wire(WireChange::UpsertPushScope(pb::PushScope::from(&web))),
            wire(WireChange::DeletePushScope(web.name.to_string())),
            wire(WireChange::DeleteIntegration(crm.name.to_string())),
        ])
        .unwrap();
        assert_eq!(
            decoded,
            [
                Change::UpsertIntegration(crm.clone()),
                Change::UpsertPushScope(web.clone()),
                Change::DeletePushScope(web.name.clone()),
                Change::DeleteIntegration(crm.name.clone()),
            ]
        );
        let snapshot = decode_snapshot(pb::ConfigSnapshot {
            integrations: vec![integration_config(&crm)],
            push_scopes: vec![pb::PushScope::from(&web)],
        })
        .unwrap();
        assert_eq!(
            snapshot,
            Snapshot {
                integrations: vec![crm],
                push_scopes: vec![web],
            }
        );
    }

    #[test]
    fn decoding_errors_name_the_field_and_fail_the_whole_message() {
        let mut bad_scope = pb::PushScope::from(&scope("web", "crm"));
        bad_scope.level = 0;
        let err = decode_changes(vec![
            wire(WireChange::UpsertIntegration(integration_config(
                &integration("new"),
            ))),
            wire(WireChange::UpsertPushScope(bad_scope.clone())),
        ])
        .unwrap_err();
        assert_eq!(err.field, "changes[1].upsert_push_scope.level");

        for (change, field) in [
            (
                wire(WireChange::DeleteIntegration("nonsense".into())),
                "changes[0].delete_integration",
            ),
            (
                wire(WireChange::DeletePushScope(
                    "accounts/acme/integrations/crm".into(),
                )),
                "changes[0].delete_push_scope",
            ),
            (pb::ConfigChange { change: None }, "changes[0].change"),
            (
                wire(WireChange::UpsertIntegration(
                    pb::IntegrationConfig::default(),
                )),
                "changes[0].upsert_integration.integration",
            ),
        ] {
            assert_eq!(decode_changes(vec![change]).unwrap_err().field, field);
        }

        let snapshot = |push_scopes| pb::ConfigSnapshot {
            integrations: vec![integration_config(&integration("crm"))],
            push_scopes,
        };
        let good = pb::PushScope::from(&scope("web", "crm"));
        let err = decode_snapshot(snapshot(vec![good.clone(), good, bad_scope])).unwrap_err();
        assert_eq!(err.field, "snapshot.push_scopes[2].level");
        let mut bad_integration = snapshot(Vec::new());
        bad_integration.integrations[0].integration = None;
        assert_eq!(
            decode_snapshot(bad_integration).unwrap_err().field,
            "snapshot.integrations[0].integration"
        );
    }

    #[test]
    fn stale_changes_are_ignored_without_being_decoded() {
        let t1 = swapped(step(None, snapshot_msg(5, &["a"])));
        let mut stale = upsert_msg(5, "b");
        stale.changes = vec![pb::ConfigChange { change: None }];
        assert!(matches!(step(Some(&t1), stale), Ok(Step::Ignore)));
    }

    /// A fake control plane: each WatchConfig call takes the next session of its script
    /// (refused with a code, or these messages then the end of the stream, or then a stream
    /// held open) and records its `from_revision`.
    #[derive(Clone, Default)]
    struct FakeControlPlane {
        sessions: Arc<Mutex<std::collections::VecDeque<FakeSession>>>,
        froms: Arc<Mutex<Vec<i64>>>,
    }

    #[derive(Clone)]
    enum FakeSession {
        Refuse(tonic::Code),
        Send(Vec<pb::WatchConfigResponse>, bool),
    }

    impl FakeControlPlane {
        fn new(sessions: Vec<FakeSession>) -> Self {
            let fake = Self::default();
            fake.sessions.lock().unwrap().extend(sessions);
            fake
        }

        fn froms(&self) -> Vec<i64> {
            self.froms.lock().unwrap().clone()
        }

        fn candidate(&self, name: &str) -> Candidate {
            use pb::config_service_server::ConfigServiceServer;
            let (channel, incoming) = crate::in_process::channel();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(ConfigServiceServer::new(self.clone()))
                    .serve_with_incoming(incoming),
            );
            Candidate {
                name: name.into(),
                channel: tonic::service::interceptor::InterceptedService::new(
                    channel,
                    pushwire_common::auth::Bearer::none(),
                ),
            }
        }
    }

    #[tonic::async_trait]
    impl pb::config_service_server::ConfigService for FakeControlPlane {
        type WatchConfigStream = std::pin::Pin<
            Box<
                dyn tokio_stream::Stream<Item = Result<pb::WatchConfigResponse, tonic::Status>>
                    + Send,
            >,
        >;

        async fn watch_config(
            &self,
            request: tonic::Request<pb::WatchConfigRequest>,
        ) -> Result<tonic::Response<Self::WatchConfigStream>, tonic::Status> {
            self.froms
                .lock()
                .unwrap()
                .push(request.get_ref().from_revision);
            let next = self.sessions.lock().unwrap().pop_front();
            match next {
                None => Err(tonic::Status::unavailable("script over")),
                Some(FakeSession::Refuse(code)) => Err(tonic::Status::new(code, "scripted")),
                Some(FakeSession::Send(msgs, hold)) => {
                    let msgs = tokio_stream::iter(msgs.into_iter().map(Ok));
                    let stream: Self::WatchConfigStream = if hold {
                        Box::pin(tokio_stream::StreamExt::chain(
                            msgs,
                            tokio_stream::pending(),
                        ))
                    } else {
                        Box::pin(msgs)
                    };
                    Ok(tonic::Response::new(stream))
                }
            }
        }
    }

    fn progress(revision: i64) -> pb::WatchConfigResponse {
        pb::WatchConfigResponse {
            revision,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn fails_over_to_the_next_control_plane_at_once_and_resumes_from_its_revision() {
        // "a" serves a snapshot at 5 then ends its stream; "b" refuses; "c" resumes from 5
        // with a change at 7 and a progress message, and holds the stream.
        let a = FakeControlPlane::new(vec![FakeSession::Send(
            vec![snapshot_msg(5, &["x"])],
            false,
        )]);
        let b = FakeControlPlane::new(vec![FakeSession::Refuse(tonic::Code::Unavailable)]);
        let c = FakeControlPlane::new(vec![FakeSession::Send(
            vec![upsert_msg(7, "y"), progress(7)],
            true,
        )]);
        let planes =
            ControlPlanes::channels(vec![a.candidate("a"), b.candidate("b"), c.candidate("c")]);
        let (tx, mut rx) = watch::channel(None);
        let health = Arc::new(WatchHealth::default());
        let shutdown = CancellationToken::new();
        let opts = WatchOptions {
            // Longer than the test's bound: a wait between control planes would fail it.
            backoff_initial: Duration::from_secs(60),
            backoff_max: Duration::from_secs(60),
            ..WatchOptions::default()
        };
        let task = tokio::spawn(run_with(
            planes.clone(),
            tx,
            health.clone(),
            shutdown.clone(),
            opts,
        ));
        let table = table_at(&mut rx, 7).await;
        assert!(has(&table, "x") && has(&table, "y"));
        assert_eq!(a.froms(), [0]);
        assert_eq!(b.froms(), [5], "b asked to resume");
        assert_eq!(c.froms(), [5], "c resumed from the table's revision");
        assert_eq!(health.snapshots(), 1, "no snapshot after the first");
        assert!(health.ever_confirmed());
        assert!(health.staleness() < Duration::from_secs(5));
        // The control plane in use, for the 410 consumer.
        for _ in 0..100 {
            if planes.current().is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(planes.current().map(|c| c.name), Some("c".to_owned()));
        assert_eq!(health.control_plane().as_deref(), Some("c"));
        shutdown.cancel();
        task.await.unwrap();
        assert!(planes.current().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_control_plane_silent_after_progress_messages_is_left_for_the_next() {
        let a = FakeControlPlane::new(vec![FakeSession::Send(
            vec![snapshot_msg(5, &["x"]), progress(5)],
            true,
        )]);
        let b = FakeControlPlane::new(vec![FakeSession::Send(vec![progress(5)], true)]);
        let planes = ControlPlanes::channels(vec![a.candidate("a"), b.candidate("b")]);
        let (tx, _rx) = watch::channel(None);
        let health = Arc::new(WatchHealth::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with(
            planes,
            tx,
            health.clone(),
            shutdown.clone(),
            WatchOptions::default(),
        ));
        let started = Instant::now();
        while b.froms().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let waited = started.elapsed();
        assert!(
            waited >= DEFAULT_SILENCE && waited < DEFAULT_SILENCE + Duration::from_secs(1),
            "{waited:?}"
        );
        assert_eq!(b.froms(), [5]);
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_watch_on_its_own_thread_publishes_and_ends_with_the_shutdown() {
        let a = FakeControlPlane::new(vec![FakeSession::Send(
            vec![snapshot_msg(5, &["x"]), upsert_msg(6, "y")],
            true,
        )]);
        let planes = ControlPlanes::channels(vec![a.candidate("a")]);
        let (tx, mut rx) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let ended = run_on_own_thread(
            planes,
            tx,
            Arc::new(WatchHealth::default()),
            shutdown.clone(),
            WatchOptions::default(),
        )
        .unwrap();
        let table = table_at(&mut rx, 6).await;
        assert!(has(&table, "x") && has(&table, "y"));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the thread ends within 5 s of the shutdown");
        // The table's sender went with the thread.
        assert!(rx.has_changed().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn staleness_counts_from_the_last_confirmation() {
        let health = WatchHealth::default();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            health.staleness(),
            Duration::from_secs(3),
            "since the start"
        );
        assert!(!health.ever_confirmed());
        health.confirm();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(health.staleness(), Duration::from_secs(2));
    }

    #[test]
    fn default_options() {
        let o = WatchOptions::default();
        assert_eq!(o.max_message_size, 64 * 1024 * 1024);
    }
}
