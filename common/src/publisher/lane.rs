//! One lane: the `Publish` streams to one worker address, one at a time. A lane takes
//! participations from the shared queue while it has room in its window, matches
//! acknowledgements by `request_id`, and when its stream fails puts back every participation
//! the stream did not acknowledge (another lane, on another worker, takes them), then
//! reconnects with a jittered backoff.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::queue::{Item, Shared, sleep_or};
use crate::auth::Bearer;
use crate::backoff::Backoff;
use crate::pb::v1 as pb;
use crate::target::Target;
use pb::ingest_service_client::IngestServiceClient;

/// The client of one lane: its channel, with the publisher's token on every call.
type Client = IngestServiceClient<InterceptedService<Channel, Bearer>>;

/// How often participations in flight are checked against their deadline.
const EXPIRY_TICK: Duration = Duration::from_millis(200);

/// Runs the lane for `addr` of `target` until `retire` (or the publisher's stop) is
/// cancelled; `failed` is notified when a stream fails, so the target re-resolves its name.
pub(crate) async fn run(
    shared: Arc<Shared>,
    target: Arc<Target>,
    addr: SocketAddr,
    retire: CancellationToken,
    failed: Arc<Notify>,
) {
    shared.lanes.fetch_add(1, Ordering::Relaxed);
    let _lane = LaneCount(&shared);
    let channel = match endpoint(&shared, &target, addr) {
        Ok(e) => e.connect_lazy(),
        Err(e) => {
            shared.set_last_error(format!("{addr}: {e}"));
            return;
        }
    };
    let (initial, max) = shared.opts.backoff;
    let mut backoff = Backoff::new(initial, max);
    let mut client = IngestServiceClient::with_interceptor(channel, shared.bearer.clone());
    while !retire.is_cancelled() {
        let mut session = Session {
            shared: &shared,
            addr,
            in_flight: HashMap::new(),
            expired: HashSet::new(),
            acked: false,
        };
        let end = session.run(&mut client, &retire).await;
        if session.acked {
            backoff.reset();
        }
        let mut unacked: Vec<Item> = std::mem::take(&mut session.in_flight)
            .into_values()
            .collect();
        shared.in_flight.fetch_sub(unacked.len(), Ordering::Relaxed);
        match end {
            Ok(()) => {
                shared.requeue(unacked, "the stream ended");
            }
            Err(Ended { error, refused }) => {
                if refused {
                    // The worker reads in order and answers for everything it read before
                    // ending the stream for a request: the first one sent of those not
                    // answered for. It is refused for good; the others go out again.
                    unacked.sort_by_key(|i| i.sent);
                    if !unacked.is_empty() {
                        let culprit = unacked.remove(0);
                        let response = pb::PublishResponse {
                            error: format!("the worker refused it and ended the stream: {error}"),
                            request_id: culprit.request.request_id.clone(),
                            ..Default::default()
                        };
                        culprit.finish(Ok(response));
                    }
                }
                let error = format!("{addr}: {error}");
                tracing::debug!(%error, unacked = unacked.len(), "publish stream failed");
                shared.stream_failures.fetch_add(1, Ordering::Relaxed);
                shared.requeue(unacked, &error);
                shared.set_last_error(error);
                failed.notify_one();
            }
        }
        if !sleep_or(&retire, backoff.next_delay()).await {
            break;
        }
    }
}

/// Counts a lane while alive.
struct LaneCount<'a>(&'a Shared);

impl Drop for LaneCount<'_> {
    fn drop(&mut self) {
        self.0.lanes.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a stream ended before its lane closed it.
struct Ended {
    error: String,
    /// The worker ended it because of the request it read last (`PERMISSION_DENIED`: an
    /// account the token may not use; `INVALID_ARGUMENT`, `OUT_OF_RANGE`: a message it could
    /// not take): sending that request again would end the next stream too.
    refused: bool,
}

impl From<String> for Ended {
    fn from(error: String) -> Self {
        Self {
            error,
            refused: false,
        }
    }
}

impl From<&tonic::Status> for Ended {
    fn from(status: &tonic::Status) -> Self {
        use tonic::Code;
        Self {
            error: describe(status),
            refused: matches!(
                status.code(),
                Code::PermissionDenied | Code::InvalidArgument | Code::OutOfRange
            ),
        }
    }
}

/// The channel settings: connect timeout, HTTP/2 keep-alives so that a worker gone silent (a
/// dead node, a partition) fails the stream instead of holding its participations, and for
/// `https://` TLS checked against the target's host name (not the address connected to).
fn endpoint(shared: &Shared, target: &Target, addr: SocketAddr) -> Result<Endpoint, String> {
    let origin = target.origin().parse().map_err(|e| format!("{e}"))?;
    let endpoint = Endpoint::from_shared(format!("{}://{addr}", target.scheme()))
        .map_err(|e| e.to_string())?
        .origin(origin)
        .connect_timeout(shared.opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if !target.tls {
        return Ok(endpoint);
    }
    let opts = &shared.opts.tls;
    let mut tls = ClientTlsConfig::new().domain_name(target.host.clone());
    tls = match &opts.ca_pem {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
        None => tls.with_native_roots(),
    };
    if let Some((cert, key)) = &opts.client_identity {
        tls = tls.identity(Identity::from_pem(cert, key.expose()));
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| format!("TLS settings: {e}"))
}

/// Counts an open stream while alive.
struct OpenStream<'a>(&'a Shared);

impl<'a> OpenStream<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.token_refused.send_replace(None);
        shared.open_streams.send_modify(|n| *n += 1);
        Self(shared)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.open_streams.send_modify(|n| *n -= 1);
    }
}

/// One stream.
struct Session<'a> {
    shared: &'a Shared,
    addr: SocketAddr,
    /// Sent, not acknowledged, by request id.
    in_flight: HashMap<u64, Item>,
    /// Given up (deadline) while in flight: they keep their place in the window until the
    /// worker answers for them or the stream ends.
    expired: HashSet<u64>,
    /// Whether the stream acknowledged anything (it was healthy: reset the backoff).
    acked: bool,
}

impl Session<'_> {
    /// Runs one stream to its end: `Ok` when it ended cleanly after `retire`, `Err` with why
    /// it failed otherwise. What is still in `in_flight` afterwards was not acknowledged.
    async fn run(&mut self, client: &mut Client, retire: &CancellationToken) -> Result<(), Ended> {
        let window = self.shared.opts.window.max(1);
        let (tx, rx) = mpsc::channel(window);
        let opening = tokio::select! {
            r = tokio::time::timeout(self.shared.opts.connect_timeout, client.publish(ReceiverStream::new(rx))) => r,
            () = retire.cancelled() => return Ok(()),
        };
        let mut responses = match opening {
            Ok(Ok(response)) => response.into_inner(),
            // Refused at the start: nothing was sent, nobody to blame. The authentication
            // refuses the token there, before any message (wait_connected says so at once).
            Ok(Err(status)) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) {
                    let why = format!("{}: {}", self.addr, describe(&status));
                    self.shared.token_refused.send_replace(Some(why));
                }
                return Err(describe(&status).into());
            }
            Err(_) => {
                return Err(format!(
                    "no answer to Publish within {:?}",
                    self.shared.opts.connect_timeout
                )
                .into());
            }
        };
        let _open = OpenStream::new(self.shared);
        let mut tx = Some(tx);
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = tx.is_some() && self.in_flight.len() + self.expired.len() < window;
            tokio::select! {
                biased;
                message = responses.message() => match message {
                    Ok(Some(response)) => self.acknowledged(response),
                    // The worker ends a stream cleanly only once we closed our side and it
                    // answered for everything it read.
                    Ok(None) if tx.is_none() => return Ok(()),
                    Ok(None) => return Err(String::from("the worker ended the stream").into()),
                    Err(status) => return Err((&status).into()),
                },
                () = retire.cancelled(), if tx.is_some() => {
                    // Closing our side: the worker answers for what it holds, then ends the
                    // stream.
                    tx = None;
                }
                // Retired with nothing left to answer for: done, whatever the worker does.
                () = std::future::ready(()), if tx.is_none() && self.in_flight.is_empty() => {
                    return Ok(());
                }
                item = self.shared.next(), if room => {
                    let Some(sender) = &tx else { unreachable!("room implies an open side") };
                    self.send(sender, item).map_err(Ended::from)?;
                }
                _ = tick.tick() => self.expire(),
            }
        }
    }

    fn send(
        &mut self,
        tx: &mpsc::Sender<pb::PublishRequest>,
        mut item: Item,
    ) -> Result<(), String> {
        // Never full: at most `window` requests are in flight and the channel holds `window`.
        match tx.try_send(item.request.clone()) {
            Ok(()) => {
                item.sends += 1;
                item.sent = self.shared.next_send();
                self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                self.in_flight.insert(item.id, item);
                Ok(())
            }
            Err(_) => {
                self.shared.requeue(vec![item], "the stream closed");
                Err("the request stream closed".into())
            }
        }
    }

    fn acknowledged(&mut self, response: pb::PublishResponse) {
        self.acked = true;
        let Ok(id) = response.request_id.parse::<u64>() else {
            tracing::warn!(request_id = %response.request_id, addr = %self.addr, "response to an unknown request");
            return;
        };
        if let Some(item) = self.in_flight.remove(&id) {
            self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            item.finish(Ok(response));
        } else {
            self.expired.remove(&id);
        }
    }

    /// Gives up participations in flight past their deadline; they keep their window slot.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, item)| item.expired(now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(item) = self.in_flight.remove(&id) {
                self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.expired.insert(id);
                item.give_up(&format!("in flight on {}", self.addr));
            }
        }
    }
}

/// A status as the publisher reports it.
fn describe(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}
