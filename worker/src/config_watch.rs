//! The `WatchConfig` client: keeps the worker's [`RoutingTable`] in step with the control plane
//! (DESIGN §5). Owns the stream, the reconnect loop and the revision bookkeeping, and publishes
//! every new table through a `watch` channel (one atomic swap per message). It never touches
//! delivery, keeps serving the last table while the control plane is away, and never logs
//! secrets (only names, revisions and counts).
//!
//! Decoding failures: a change that does not decode drops the stream and re-syncs from a fresh
//! snapshot (`from_revision` 0) instead of skipping it, since a skipped change (say, a new
//! `DO_NOT_PUSH` scope) would leave the worker routing on a configuration that never existed,
//! silently and until the next restart. Until the re-sync succeeds the last good table stays.

use std::sync::Arc;
use std::time::Duration;

use pb::config_service_client::ConfigServiceClient;
use pushwire_common::backoff::Backoff;
use pushwire_common::domain::convert::InvalidField;
use pushwire_common::pb::v1 as pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::ControlPlaneChannel;
use crate::router::RoutingTable;

/// Largest `WatchConfig` message accepted by default: snapshots of big installations are
/// large, and tonic's 4 MiB default would cut them off.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;

/// A stream that stayed up this long is considered healthy even if it carried nothing, so the
/// next reconnect starts again from the shortest delay.
const STABLE_STREAM: Duration = Duration::from_secs(10);

/// Settings of the watch loop.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Largest message accepted (snapshots can be large).
    pub max_message_size: usize,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// An endpoint for the control plane with the settings the watch needs: a connect timeout,
/// and HTTP/2 keep-alives so a control plane that vanished without closing the connection (a
/// dead node, a network partition) is noticed and the loop reconnects instead of waiting on
/// a silent stream forever. Add TLS to it as needed, then `connect_lazy()`.
pub fn endpoint(uri: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(uri.into())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Watches the configuration through `channel` until `shutdown`, with the default options.
/// See [`run_with`].
pub async fn run(
    channel: ControlPlaneChannel,
    table: watch::Sender<Option<Arc<RoutingTable>>>,
    shutdown: CancellationToken,
) {
    run_with(channel, table, shutdown, WatchOptions::default()).await;
}

/// Watches the configuration through `channel` (best made with `connect_lazy`, so it
/// reconnects by itself; its [`Bearer`](pushwire_common::auth::Bearer) a `worker` token) until `shutdown`, publishing each new table on `table`; `None` there
/// means no snapshot has been applied yet (not ready). Asks from the revision of the table
/// it has (0 for none); on any error or end of stream keeps that table and retries with a
/// jittered backoff, resuming from its revision.
pub async fn run_with(
    channel: ControlPlaneChannel,
    table: watch::Sender<Option<Arc<RoutingTable>>>,
    shutdown: CancellationToken,
    opts: WatchOptions,
) {
    let mut client =
        ConfigServiceClient::new(channel).max_decoding_message_size(opts.max_message_size);
    let mut backoff = Backoff::new(opts.backoff_initial, opts.backoff_max);
    let mut resync = false;
    while !shutdown.is_cancelled() {
        let current = table.borrow().as_ref().map(|t| t.revision());
        let from = if resync { 0 } else { current.unwrap_or(0) };
        let started = Instant::now();
        let mut session = Session {
            table: &table,
            received: false,
            resync: &mut resync,
        };
        let error = tokio::select! {
            e = session.follow(&mut client, from) => e,
            () = shutdown.cancelled() => break,
        };
        if session.received || started.elapsed() >= STABLE_STREAM {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match &error {
            SessionError::Decode { revision, source } => {
                resync = true;
                tracing::error!(
                    revision,
                    field = %source.field,
                    reason = %source.reason,
                    retry_in = ?delay,
                    "config watch: message does not decode; re-syncing from a snapshot, \
                     keeping the last table meanwhile"
                );
            }
            SessionError::NoBaseline { revision } => {
                resync = true;
                tracing::error!(
                    revision,
                    retry_in = ?delay,
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
                    retry_in = ?delay,
                    "config watch: the control plane refused this worker's credentials \
                     (--control-plane-token-file must hold a worker token)"
                )
            }
            SessionError::Rpc(status) => tracing::warn!(
                code = ?status.code(),
                message = status.message(),
                from,
                retry_in = ?delay,
                "config watch: stream failed; keeping the last table"
            ),
            SessionError::Ended => tracing::info!(
                from,
                retry_in = ?delay,
                "config watch: stream ended; reconnecting"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => break,
        }
    }
    tracing::debug!("config watch stopped");
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
}

/// What one message does to the current table.
#[derive(Debug)]
enum Step {
    /// Publish this table.
    Swap(Arc<RoutingTable>),
    /// Already applied (a revision not newer than ours).
    Ignore,
}

/// Applies one `WatchConfig` message to `current`. A snapshot always replaces the table, even
/// at an older revision: the control plane only sends one older than ours when its store is
/// behind us (a lagging replica, which catches up within moments, or a store restored from a
/// backup, where refusing it would wedge the worker on a history that no longer exists).
/// Changes not newer than our revision were already applied and are ignored.
fn step(
    current: Option<&RoutingTable>,
    msg: pb::WatchConfigResponse,
) -> Result<Step, SessionError> {
    let revision = msg.revision;
    let decode = |source| SessionError::Decode { revision, source };
    if let Some(snapshot) = msg.snapshot {
        let mut fresh = RoutingTable::from_snapshot(revision, snapshot).map_err(decode)?;
        if !msg.changes.is_empty() {
            // Not sent by the control plane; the changes of revision R are part of the
            // snapshot at R, so applying them again is harmless.
            fresh = fresh.apply(revision, msg.changes).map_err(decode)?;
        }
        return Ok(Step::Swap(Arc::new(fresh)));
    }
    let Some(current) = current else {
        return Err(SessionError::NoBaseline { revision });
    };
    if revision <= current.revision() {
        return Ok(Step::Ignore);
    }
    Ok(Step::Swap(Arc::new(
        current.apply(revision, msg.changes).map_err(decode)?,
    )))
}

/// One `WatchConfig` stream.
struct Session<'a> {
    table: &'a watch::Sender<Option<Arc<RoutingTable>>>,
    /// Whether a message was applied (the stream was useful: reset the backoff).
    received: bool,
    resync: &'a mut bool,
}

impl Session<'_> {
    /// Follows one stream from `from` until it fails or ends; returns why.
    async fn follow(
        &mut self,
        client: &mut ConfigServiceClient<ControlPlaneChannel>,
        from: i64,
    ) -> SessionError {
        let mut stream = match client
            .watch_config(pb::WatchConfigRequest {
                from_revision: from,
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return SessionError::Rpc(status),
        };
        tracing::debug!(from, "config watch: stream open");
        loop {
            let msg = match stream.message().await {
                Ok(Some(msg)) => msg,
                Ok(None) => return SessionError::Ended,
                Err(status) => return SessionError::Rpc(status),
            };
            let revision = msg.revision;
            let is_snapshot = msg.snapshot.is_some();
            let changes = msg.changes.len();
            let current = self.table.borrow().clone();
            let next = match step(current.as_deref(), msg) {
                Ok(Step::Swap(next)) => next,
                Ok(Step::Ignore) => {
                    tracing::debug!(revision, "config watch: ignoring changes already applied");
                    continue;
                }
                Err(e) => return e,
            };
            if is_snapshot {
                *self.resync = false;
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
                    "config watch: snapshot applied"
                );
            } else {
                tracing::debug!(revision, changes, "config watch: changes applied");
            }
            self.table.send_replace(Some(next));
            self.received = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use pb::config_change::Change;
    use pushwire_common::domain::convert::integration_config;
    use pushwire_common::domain::{
        AccountName, IncompletePolicy, Integration, IntegrationName, PayloadVariables,
        SignatureScheme,
    };

    use super::*;

    fn integration(id: &str) -> Integration {
        Integration {
            name: IntegrationName::new(&AccountName::from_id("acme").unwrap(), id).unwrap(),
            display_name: id.to_owned(),
            url: format!("https://{id}.example.org/hook"),
            enabled: true,
            disabled_reason: String::new(),
            incomplete_participations: IncompletePolicy::Skip,
            payload_variables: PayloadVariables::AsPublished,
            auth_header: None,
            secrets: Vec::new(),
            signature_schemes: vec![SignatureScheme::Qualifio],
            create_time: SystemTime::UNIX_EPOCH,
            update_time: SystemTime::UNIX_EPOCH,
            revision: 1,
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
            changes: Vec::new(),
        }
    }

    fn upsert_msg(revision: i64, id: &str) -> pb::WatchConfigResponse {
        pb::WatchConfigResponse {
            revision,
            snapshot: None,
            changes: vec![pb::ConfigChange {
                change: Some(Change::UpsertIntegration(integration_config(&integration(
                    id,
                )))),
            }],
        }
    }

    fn swapped(step: Result<Step, SessionError>) -> Arc<RoutingTable> {
        match step {
            Ok(Step::Swap(t)) => t,
            other => panic!("expected a new table, got {other:?}"),
        }
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
            change: Some(Change::DeleteIntegration("garbage".into())),
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

    #[test]
    fn default_options() {
        let o = WatchOptions::default();
        assert_eq!(o.max_message_size, 64 * 1024 * 1024);
        assert!(endpoint("http://127.0.0.1:1").is_ok());
        assert!(endpoint("not a uri").is_err());
    }
}
