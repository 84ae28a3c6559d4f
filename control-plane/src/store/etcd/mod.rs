//! [`EtcdStore`]: the [`Store`] contract on an etcd v3 cluster, the production backend, and the
//! only module that sees `etcd_client` types. Guards and writes become one etcd transaction,
//! prefix reads and watches become etcd ranges. Which member a call goes to, and what a failed
//! attempt means, is `members.rs`: every call is bounded, so an unreachable cluster yields
//! [`StoreError::Unavailable`] rather than a hang.

mod members;

use std::collections::VecDeque;
use std::fmt;

use async_trait::async_trait;
use etcd_client::{
    Client, CompactionOptions, Compare as EtcdCompare, CompareOp, EventType, GetOptions, KvClient,
    SortOrder, SortTarget, Txn as EtcdTxn, TxnOp, WatchClient, WatchOptions, WatchResponse,
};
use tokio_util::sync::CancellationToken;

use self::members::{Kind, Members};
use super::{
    Compare, Event, KeyValue, Op, Pages, Range, Store, StoreError, Txn, TxnOutcome, WatchBatch,
    WatchStream, check_txn, keys,
};

/// Sizes of what etcd sends; [`Limits::default`] in production, smaller in tests.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest response accepted (a page of a range, a watch response).
    pub max_response_bytes: usize,
    /// Keys asked for per page of a range; halved for a range whose page is too large.
    pub page_keys: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_response_bytes: 64 * 1024 * 1024,
            // Records are about 0.5 KiB: a page of about 5 MiB, and 500 of 64 KiB fit the cap.
            page_keys: 10_000,
        }
    }
}

/// A [`Store`] backed by etcd v3. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct EtcdStore {
    members: Members,
    limits: Limits,
}

/// etcd broke off a watch or answered outside its protocol.
#[derive(Debug, thiserror::Error)]
enum WatchFailed {
    #[error("etcd closed the watch stream")]
    Closed,
    #[error("etcd canceled the watch: {0}")]
    Canceled(String),
    #[error("etcd did not confirm the watch")]
    NotCreated,
    #[error("the etcd member serving the watch left rotation")]
    MemberDown,
}

/// An etcd answer without the header that carries the revision.
#[derive(Debug, thiserror::Error)]
#[error("etcd response without a header")]
struct NoHeader;

impl EtcdStore {
    /// Connects to the etcd cluster whose members are `endpoints` (`http://host:port` URLs;
    /// give every member) and checks that it answers, failing with
    /// [`StoreError::Unavailable`] within a few seconds if no member does.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, Limits::default()).await
    }

    /// [`EtcdStore::connect`] with other [`Limits`].
    pub async fn connect_with(endpoints: &[String], limits: Limits) -> Result<Self, StoreError> {
        let store = Self {
            members: Members::new(endpoints).await?,
            limits,
        };
        store.revision().await?;
        Ok(store)
    }

    fn kv(&self, client: &Client) -> KvClient {
        client
            .kv_client()
            .max_decoding_message_size(self.limits.max_response_bytes)
    }

    fn watcher(&self, client: &Client) -> WatchClient {
        client
            .watch_client()
            .max_decoding_message_size(self.limits.max_response_bytes)
    }

    /// One page of a range: up to `limit` keys from `start` (inclusive) to `end` (exclusive),
    /// at `revision` (0: the current one).
    async fn page(
        &self,
        start: &[u8],
        end: &[u8],
        limit: i64,
        revision: i64,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        self.members
            .call(Kind::Read, |client, _| async move {
                let options = GetOptions::new()
                    .with_range(end)
                    .with_limit(limit)
                    .with_revision(revision)
                    .with_sort(SortTarget::Key, SortOrder::Ascend);
                self.kv(&client)
                    .get(start, Some(options))
                    .await
                    .map_err(etcd)
            })
            .await
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end of a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the key space.
    vec![0]
}

/// Whether etcd refused a response for its size (the decoder's cap).
fn too_large(error: &StoreError) -> bool {
    matches!(error, StoreError::Unavailable(e) if matches!(
        e.downcast_ref::<etcd_client::Error>(),
        Some(etcd_client::Error::GRpcStatus(status))
            if status.message().contains("message length too large")
    ))
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.members.endpoints())
            .finish_non_exhaustive()
    }
}

/// `scheme://user:password@host` -> `scheme://host`, so that logs never carry credentials.
fn without_credentials(endpoint: &str) -> String {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("", endpoint));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    if scheme.is_empty() {
        rest.to_owned()
    } else {
        format!("{scheme}://{rest}")
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, StoreError> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::unavailable(NoHeader))
}

fn utf8_key(key: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(key.to_vec()).map_err(|_| {
        StoreError::Corrupt(format!(
            "etcd key is not UTF-8: {}",
            String::from_utf8_lossy(key)
        ))
    })
}

fn to_key_value(kv: etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let (create_revision, mod_revision) = (kv.create_revision(), kv.mod_revision());
    let (key, value) = kv.into_key_value();
    Ok(KeyValue {
        key: utf8_key(&key)?,
        value,
        create_revision,
        mod_revision,
    })
}

fn to_etcd_compare(compare: Compare) -> EtcdCompare {
    match compare {
        Compare::Absent(key) => EtcdCompare::create_revision(key, CompareOp::Equal, 0),
        Compare::ModRevision(key, revision) => {
            EtcdCompare::mod_revision(key, CompareOp::Equal, revision)
        }
        // etcd holds a range compare over an empty range against the zero key, which passes.
        Compare::PrefixUnchangedSince { prefix, revision } => {
            EtcdCompare::mod_revision(prefix, CompareOp::Less, revision.saturating_add(1))
                .with_prefix()
        }
    }
}

/// The revision to ask etcd for when the caller wants history from `from_revision`: one earlier.
///
/// etcd lets a watch start at the compaction revision itself, but compaction has removed that
/// revision's deletions, so such a watch silently misses them. Starting one revision earlier
/// makes etcd answer "compacted" exactly when the requested revision is at or below the
/// compaction revision, which is the contract (and the embedded store's behaviour); the extra
/// revision's events are dropped. Revision 1 (the empty store) has no events to lose, and 0 or
/// less means "from the next commit" to etcd as here.
fn watch_start(from_revision: i64) -> i64 {
    if from_revision <= 1 {
        from_revision.max(0)
    } else {
        from_revision - 1
    }
}

/// A watch in progress: responses are split into one batch per revision (etcd may put several
/// revisions in one response but never splits one, as fragmenting is off).
struct Follower {
    stream: etcd_client::WatchStream,
    /// The tenure of the member serving the watch: the watch ends when the member leaves
    /// rotation, so the caller re-watches through another one.
    tenure: CancellationToken,
    ready: VecDeque<WatchBatch>,
    /// Events before this revision are the look-behind of [`watch_start`] and are dropped.
    from: i64,
    /// First revision not delivered yet; reported if etcd compacts it away.
    next: i64,
    finished: bool,
}

impl Follower {
    async fn next_batch(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        // Each pass consumes one response; the stream ends after its first error.
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Some(Ok(batch));
            }
            if self.finished {
                return None;
            }
            // No timeout: a watch may idle for ever. A dead connection is found by keep-alive
            // pings, a dead or frozen member by the prober, which ends its tenure.
            let message = tokio::select! {
                m = self.stream.message() => m,
                () = self.tenure.cancelled() => {
                    self.finished = true;
                    return Some(Err(StoreError::unavailable(WatchFailed::MemberDown)));
                }
            };
            let absorbed = match message {
                Ok(Some(response)) => self.absorb(&response),
                Ok(None) => Err(StoreError::unavailable(WatchFailed::Closed)),
                Err(err) => Err(StoreError::unavailable(err)),
            };
            if let Err(err) = absorbed {
                self.finished = true;
                return Some(Err(err));
            }
        }
    }

    fn absorb(&mut self, response: &WatchResponse) -> Result<(), StoreError> {
        if response.compact_revision() != 0 {
            return Err(StoreError::Compacted {
                requested: self.next,
                compacted: response.compact_revision(),
            });
        }
        if response.canceled() {
            return Err(StoreError::unavailable(WatchFailed::Canceled(
                response.cancel_reason().to_owned(),
            )));
        }
        for event in response.events() {
            let kv = event
                .kv()
                .ok_or_else(|| StoreError::Corrupt("etcd watch event without a key".to_owned()))?;
            let revision = kv.mod_revision();
            if revision < self.from {
                continue;
            }
            let event = match event.event_type() {
                EventType::Put => Event::Put(to_key_value(kv.clone())?),
                EventType::Delete => Event::Delete {
                    key: utf8_key(kv.key())?,
                },
            };
            match self.ready.back_mut() {
                Some(batch) if batch.revision == revision => batch.events.push(event),
                _ => self.ready.push_back(WatchBatch {
                    revision,
                    events: vec![event],
                }),
            }
            self.next = revision + 1;
        }
        Ok(())
    }
}

fn etcd(e: etcd_client::Error) -> StoreError {
    StoreError::unavailable(e)
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut response = self
            .members
            .call(Kind::Read, |client, _| async move {
                self.kv(&client).get(key, None).await.map_err(etcd)
            })
            .await?;
        response
            .take_kvs()
            .into_iter()
            .next()
            .map(to_key_value)
            .transpose()
    }

    /// All at the revision of the first page, so neither a message-size cap nor the size of
    /// the configuration is in the way; a page that is still too large is asked for again
    /// with half the keys.
    fn range_pages<'a>(&'a self, prefix: &'a str) -> Pages<'a> {
        struct Next {
            start: Vec<u8>,
            limit: i64,
            revision: i64,
        }
        let end = prefix_end(prefix.as_bytes());
        let first = Next {
            start: prefix.as_bytes().to_vec(),
            limit: self.limits.page_keys.max(1),
            revision: 0,
        };
        Box::pin(futures_util::stream::try_unfold(Some(first), move |next| {
            let end = end.clone();
            async move {
                let Some(mut next) = next else {
                    return Ok(None);
                };
                let mut page = loop {
                    match self
                        .page(&next.start, &end, next.limit, next.revision)
                        .await
                    {
                        Err(e) if too_large(&e) && next.limit > 1 => next.limit /= 2,
                        page => break page?,
                    }
                };
                if next.revision == 0 {
                    next.revision = header_revision(page.header())?;
                }
                let more = page.more();
                let kvs = page
                    .take_kvs()
                    .into_iter()
                    .map(to_key_value)
                    .collect::<Result<Vec<_>, _>>()?;
                let revision = next.revision;
                let next = match kvs.last() {
                    Some(last) if more => {
                        // The next page starts just after the last key.
                        next.start = last.key.as_bytes().to_vec();
                        next.start.push(0);
                        Some(next)
                    }
                    _ => None,
                };
                Ok(Some((Range { revision, kvs }, next)))
            }
        }))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        check_txn(&txn)?;
        let compares: Vec<EtcdCompare> = txn.compares.into_iter().map(to_etcd_compare).collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(key, value, None),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let request = EtcdTxn::new().when(compares).and_then(ops);
        // A lost answer leaves the outcome unknown: `call` says so instead of sending it again.
        let response = self
            .members
            .call(Kind::Write, |client, _| {
                let request = request.clone();
                async move { self.kv(&client).txn(request).await.map_err(etcd) }
            })
            .await?;
        if !response.succeeded() {
            return Ok(TxnOutcome::Conflict);
        }
        Ok(TxnOutcome::Committed {
            revision: header_revision(response.header())?,
        })
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let follower = self
            .members
            .call(Kind::Read, |client, tenure| async move {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(watch_start(from_revision));
                let stream = self
                    .watcher(&client)
                    .watch(prefix, Some(options))
                    .await
                    .map_err(etcd)?;
                let mut follower = Follower {
                    stream,
                    tenure,
                    ready: VecDeque::new(),
                    from: from_revision,
                    next: from_revision,
                    finished: false,
                };
                // Waiting for etcd's confirmation makes a failure to register surface here.
                match follower.stream.message().await.map_err(etcd)? {
                    Some(response) if response.created() => follower.absorb(&response)?,
                    Some(response) => {
                        follower.absorb(&response)?;
                        return Err(StoreError::unavailable(WatchFailed::NotCreated));
                    }
                    None => return Err(StoreError::unavailable(WatchFailed::Closed)),
                }
                Ok(follower)
            })
            .await?;
        Ok(Box::pin(futures_util::stream::unfold(
            follower,
            |mut follower| async move {
                let item = follower.next_batch().await?;
                Some((item, follower))
            },
        )))
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let result = self
            .members
            .call(Kind::Write, |client, _| async move {
                let options = CompactionOptions::new().with_physical();
                self.kv(&client)
                    .compact(revision, Some(options))
                    .await
                    .map_err(etcd)
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // Compacting at or below the compacted revision has nothing left to do.
            Err(StoreError::Unavailable(e))
                if matches!(
                    e.downcast_ref::<etcd_client::Error>(),
                    Some(etcd_client::Error::GRpcStatus(status))
                        if status.message().contains("required revision has been compacted")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        let response = self
            .members
            .call(Kind::Read, |client, _| async move {
                // A count of one key that never exists: the cheapest read with the revision.
                let options = GetOptions::new().with_count_only();
                self.kv(&client)
                    .get(keys::ROOT, Some(options))
                    .await
                    .map_err(etcd)
            })
            .await?;
        header_revision(response.header())
    }

    async fn recovered(&self) {
        self.members.recovered().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn credentials_never_reach_debug_output() {
        assert_eq!(
            without_credentials("http://user:secret@10.0.0.1:2379/x"),
            "http://10.0.0.1:2379/x"
        );
        assert_eq!(
            without_credentials("https://etcd-0:2379"),
            "https://etcd-0:2379"
        );
        assert_eq!(without_credentials("u:p@etcd:2379"), "etcd:2379");
    }
}
