//! The delivery log behind `DeliveryService`: listing, reading, counting and redelivering the
//! deliveries of the delivery store, and the retention loop that purges old ones. Knows the
//! [`DeliveryStore`] contract, never gRPC.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use pushwire_common::delivery_store::{
    DeliveryFilter, DeliveryKey, DeliveryPage, DeliveryParent, DeliveryRecord, DeliveryState,
    DeliveryStore, ListCursor, ListRequest, StatsRequest, StatsRow, StoreError,
};
use pushwire_common::domain::IntegrationName;
use pushwire_common::domain::convert::InvalidField;
use tokio_util::sync::CancellationToken;

use super::delivery_filter;

/// Deliveries per page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Most deliveries per page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Longest time range of one stats query.
pub const MAX_STATS_RANGE: Duration = Duration::from_secs(366 * 24 * 3600);
/// Rows deleted per statement by the retention loop.
const PURGE_BATCH: u32 = 1000;
/// How often the retention loop purges.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Why a delivery call was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Bad input; names the field.
    #[error(transparent)]
    InvalidArgument(#[from] InvalidField),
    /// The delivery is not stored.
    #[error("{0} not found")]
    NotFound(String),
    /// The delivery store is configured but could not be opened yet.
    #[error("the delivery store is not reachable yet; retry later")]
    NotReady,
    /// This control plane has no delivery store.
    #[error(
        "this control plane has no delivery store: start it with --delivery-store \
         (PUSHWIRE_DELIVERY_STORE) or with --with-worker"
    )]
    NoStore,
    /// The delivery store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The delivery log, over the delivery store when there is one.
#[derive(Clone, Debug)]
pub struct Deliveries {
    /// `None`: no delivery store configured; an empty cell: configured, not open yet.
    store: Option<Arc<OnceLock<Arc<dyn DeliveryStore>>>>,
}

/// A ListDeliveries query as received.
#[derive(Clone, Debug)]
pub struct ListQuery<'a> {
    /// Whose deliveries.
    pub parent: DeliveryParent,
    /// The filter text (also binds the page token).
    pub filter: &'a str,
    /// Requested size; 0 means the default.
    pub page_size: i32,
    /// `next_page_token` of the previous page.
    pub page_token: &'a str,
}

/// A page of deliveries and the token of the next one (empty on the last).
#[derive(Clone, Debug)]
pub struct ListAnswer {
    /// Newest first.
    pub deliveries: Vec<DeliveryRecord>,
    /// Empty on the last page.
    pub next_page_token: String,
}

impl Deliveries {
    /// The log over `store`; without one every call is refused with
    /// [`DeliveryError::NoStore`].
    pub fn new(store: Option<Arc<dyn DeliveryStore>>) -> Self {
        Self {
            store: store.map(|store| Arc::new(OnceLock::from(store))),
        }
    }

    /// The log over a store being opened: calls are refused with [`DeliveryError::NotReady`]
    /// until the returned cell is set.
    pub fn pending() -> (Self, Arc<OnceLock<Arc<dyn DeliveryStore>>>) {
        let cell = Arc::new(OnceLock::new());
        (
            Self {
                store: Some(Arc::clone(&cell)),
            },
            cell,
        )
    }

    fn store(&self) -> Result<&dyn DeliveryStore, DeliveryError> {
        let cell = self.store.as_ref().ok_or(DeliveryError::NoStore)?;
        cell.get()
            .map(|store| &**store)
            .ok_or(DeliveryError::NotReady)
    }

    /// One page of deliveries.
    pub async fn list(&self, query: ListQuery<'_>) -> Result<ListAnswer, DeliveryError> {
        let store = self.store()?;
        let filter = parse_filter(query.filter)?;
        let page_size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                return Err(InvalidField::new("page_size", "must not be negative").into());
            }
            n => n.unsigned_abs().min(MAX_PAGE_SIZE),
        };
        let binding = token_binding(&query.parent, query.filter);
        let after = match query.page_token {
            "" => None,
            token => Some(decode_token(token, binding).ok_or_else(|| {
                InvalidField::new(
                    "page_token",
                    "not a token this server returned for this parent and filter",
                )
            })?),
        };
        let DeliveryPage { deliveries, next } = store
            .list(&ListRequest {
                parent: query.parent,
                filter,
                page_size,
                after,
            })
            .await?;
        Ok(ListAnswer {
            deliveries,
            next_page_token: next
                .map(|cursor| encode_token(&cursor, binding))
                .unwrap_or_default(),
        })
    }

    /// One delivery with its attempts.
    pub async fn get(&self, key: &DeliveryKey) -> Result<DeliveryRecord, DeliveryError> {
        self.store()?
            .get(key)
            .await?
            .ok_or_else(|| DeliveryError::NotFound(delivery_name(key)))
    }

    /// Counts by state over `[start, end)`.
    pub async fn stats(&self, request: StatsRequest) -> Result<Vec<StatsRow>, DeliveryError> {
        let store = self.store()?;
        match request.end.duration_since(request.start) {
            Err(_) | Ok(Duration::ZERO) => {
                return Err(InvalidField::new("end_time", "must be after start_time").into());
            }
            Ok(range) if range > MAX_STATS_RANGE => {
                return Err(
                    InvalidField::new("end_time", "at most 366 days after start_time").into(),
                );
            }
            Ok(_) => {}
        }
        Ok(store.stats(&request).await?)
    }

    /// Re-queues the matching deliveries of `integration`; without a state in `filter`, the
    /// FAILED ones only.
    pub async fn redeliver(
        &self,
        integration: &IntegrationName,
        filter: &str,
        now: SystemTime,
    ) -> Result<u64, DeliveryError> {
        let store = self.store()?;
        let mut filter = parse_filter(filter)?;
        if filter.state.is_none() {
            filter.state = Some(DeliveryState::Failed);
        }
        Ok(store.redeliver(integration, &filter, now).await?)
    }
}

fn parse_filter(text: &str) -> Result<DeliveryFilter, DeliveryError> {
    delivery_filter::parse(text).map_err(|e| InvalidField::new("filter", e).into())
}

/// `accounts/{a}/integrations/{i}/deliveries/{participation id}`.
pub fn delivery_name(key: &DeliveryKey) -> String {
    format!("{}/deliveries/{}", key.integration, key.participation_id)
}

/// Ties a page token to its parent and filter (FNV-1a): a token of another listing is refused
/// rather than silently positioning this one.
fn token_binding(parent: &DeliveryParent, filter: &str) -> u64 {
    let parent = match parent {
        DeliveryParent::Account(account) => account.to_string(),
        DeliveryParent::Integration(integration) => integration.to_string(),
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parent.bytes().chain([0]).chain(filter.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

const TOKEN_VERSION: &str = "d1";

fn encode_token(cursor: &ListCursor, binding: u64) -> String {
    let text = format!(
        "{TOKEN_VERSION}\n{binding:016x}\n{}\n{}\n{}",
        cursor.create_ms, cursor.integration, cursor.participation_id
    );
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn decode_token(token: &str, binding: u64) -> Option<ListCursor> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let mut parts = text.splitn(5, '\n');
    if parts.next()? != TOKEN_VERSION {
        return None;
    }
    if u64::from_str_radix(parts.next()?, 16).ok()? != binding {
        return None;
    }
    let create_ms = parts.next()?.parse().ok()?;
    let integration = parts.next()?.to_owned();
    let participation_id = parts.next()?.to_owned();
    Some(ListCursor {
        create_ms,
        integration,
        participation_id,
    })
}

/// The metrics of the delivery log's retention.
#[derive(Clone, Debug, Default)]
pub struct RetentionMetrics {
    held: Gauge,
    purged: Counter,
}

impl RetentionMetrics {
    /// Registers `delivery_store_rows` and `delivery_store_purged_rows_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "delivery_store_rows",
            "Deliveries held in the delivery store (any state), as of the last retention pass",
            self.held.clone(),
        );
        registry.register(
            "delivery_store_purged_rows",
            "Deliveries removed by retention (--delivery-retention after their final outcome)",
            self.purged.clone(),
        );
    }
}

/// Removes deliveries whose final outcome is older than `retention`, every `interval`, in
/// batches, until `shutdown`. Several replicas may run it at once: a purge is idempotent.
pub async fn retain(
    store: Arc<dyn DeliveryStore>,
    retention: Duration,
    interval: Duration,
    metrics: RetentionMetrics,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let purge = tokio::select! {
            () = shutdown.cancelled() => return,
            purge = store.purge(before, PURGE_BATCH) => purge,
        };
        match purge {
            Ok(stats) => {
                metrics.purged.inc_by(stats.deliveries);
                if stats.deliveries > 0 {
                    tracing::info!(
                        deliveries = stats.deliveries,
                        attempts = stats.attempts,
                        bodies = stats.bodies,
                        "delivery retention purged"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "delivery retention purge failed; retrying later"),
        }
        match store.count_stored().await {
            Ok(held) => {
                metrics.held.set(i64::try_from(held).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::warn!(error = %e, "counting the stored deliveries failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use pushwire_common::domain::AccountName;

    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_listing() {
        let account = DeliveryParent::Account(AccountName::from_id("42").unwrap());
        let other = DeliveryParent::Account(AccountName::from_id("43").unwrap());
        let cursor = ListCursor {
            create_ms: 1_800_000_000_000,
            integration: "crm".into(),
            participation_id: "p\n1".into(),
        };
        let binding = token_binding(&account, "state = FAILED");
        let token = encode_token(&cursor, binding);
        assert_eq!(decode_token(&token, binding), Some(cursor));
        assert_eq!(
            decode_token(&token, token_binding(&other, "state = FAILED")),
            None
        );
        assert_eq!(decode_token(&token, token_binding(&account, "")), None);
        assert_eq!(decode_token("%%%", binding), None);
        assert_eq!(decode_token("", binding), None);
    }
}
