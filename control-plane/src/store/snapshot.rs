//! The whole configuration read at once (a control plane's start, and a config feed whose
//! watch start was compacted): page by page, each page decoded on every core while the store
//! reads the next, so that the raw read is never all in memory, and each secret decrypted
//! once, for the start-up key check and the feed alike.

use std::sync::Arc;

use futures_util::StreamExt as _;
use pushwire_common::domain::{Integration, PushScope};
use tokio::task::JoinHandle;

use super::encryption::EncryptionError;
use super::records::{self, Record};
use super::{KeyValue, Store, StoreError, keys};
use crate::crypto::Keyring;

/// Every record under [`keys::ROOT`] at one revision, decoded.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Revision of the read.
    pub revision: i64,
    /// Every integration that decoded, by store key, in key order.
    pub integrations: Vec<(String, Arc<Integration>)>,
    /// Every push scope that decoded, by store key, in key order.
    pub push_scopes: Vec<(String, Arc<PushScope>)>,
    /// The encryption check record ([`keys::ENCRYPTION_CHECK`]), as stored.
    pub check: Option<KeyValue>,
    /// Of the integrations, those with a secret under another key than the current one.
    pub stale: usize,
    /// Records left out because a secret of theirs does not open: the keys do not fit the
    /// store.
    pub refused: usize,
    /// Why the first of them was left out.
    pub refusal: Option<EncryptionError>,
}

/// One core's share of a page.
#[derive(Default)]
struct Part {
    records: Vec<(String, Decoded)>,
    integrations: usize,
    check: Option<KeyValue>,
    stale: usize,
    refused: usize,
    refusal: Option<EncryptionError>,
}

enum Decoded {
    Integration(Arc<Integration>),
    PushScope(Arc<PushScope>),
}

/// Reads and decodes every record. Each page is decoded on the blocking pool, on every core,
/// while the next page is fetched: a read of everything never holds a runtime thread. A record
/// that does not decode for another reason than its secrets is logged and left out, as the
/// config feed's watch does with a change.
pub async fn read(store: &dyn Store, keys: &Arc<Keyring>) -> Result<Snapshot, StoreError> {
    let mut pages = store.range_pages(keys::ROOT);
    let mut revision = 0;
    let mut parts = Vec::new();
    let mut decoding = None;
    while let Some(page) = pages.next().await {
        let mut page = page?;
        revision = page.revision;
        if let Some(previous) = decoding.take() {
            parts.extend(decoded(previous).await?);
        }
        let keys = Arc::clone(keys);
        decoding = Some(tokio::task::spawn_blocking(move || {
            crate::parallel::map_chunks(&mut page.kvs, |kvs| decode(kvs, &keys))
        }));
    }
    if let Some(last) = decoding {
        parts.extend(decoded(last).await?);
    }
    // Moved into vectors of their exact size, which the feed's maps are then built in.
    let integrations = parts.iter().map(|p| p.integrations).sum();
    let push_scopes = parts.iter().map(|p| p.records.len()).sum::<usize>() - integrations;
    let mut snapshot = Snapshot {
        revision,
        integrations: Vec::with_capacity(integrations),
        push_scopes: Vec::with_capacity(push_scopes),
        ..Snapshot::default()
    };
    for part in parts {
        for (key, record) in part.records {
            match record {
                Decoded::Integration(i) => snapshot.integrations.push((key, i)),
                Decoded::PushScope(s) => snapshot.push_scopes.push((key, s)),
            }
        }
        snapshot.check = snapshot.check.or(part.check);
        snapshot.stale += part.stale;
        snapshot.refused += part.refused;
        snapshot.refusal = snapshot.refusal.or(part.refusal);
    }
    Ok(snapshot)
}

/// The parts of a page, once decoded; a panic of the decoding goes on here.
async fn decoded(decoding: JoinHandle<Vec<Part>>) -> Result<Vec<Part>, StoreError> {
    decoding.await.map_err(|e| match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        // Only when the runtime shuts down.
        Err(cancelled) => StoreError::unavailable(cancelled),
    })
}

/// Decodes `kvs`, taking their keys.
fn decode(kvs: &mut [KeyValue], keys: &Keyring) -> Part {
    let mut part = Part {
        records: Vec::with_capacity(kvs.len()),
        ..Part::default()
    };
    for kv in kvs {
        if kv.key == keys::ENCRYPTION_CHECK {
            part.check = Some(std::mem::take(kv));
            continue;
        }
        let (record, stale) = match records::open_record(kv, keys) {
            Ok(Some(opened)) => opened,
            Ok(None) => continue,
            Err(EncryptionError::Store(e)) => {
                tracing::error!(error = %e, "config: skipping unreadable record");
                continue;
            }
            Err(e) => {
                part.refused += 1;
                part.refusal.get_or_insert(e);
                continue;
            }
        };
        let record = match record {
            Record::Integration(i) => {
                part.integrations += 1;
                part.stale += usize::from(stale);
                Decoded::Integration(Arc::new(i))
            }
            Record::PushScope(s) => Decoded::PushScope(Arc::new(s)),
        };
        part.records.push((std::mem::take(&mut kv.key), record));
    }
    part
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use pushwire_common::domain::{
        AccountName, Audience, IntegrationName, PushAction, PushScopeName, ScopeTarget,
    };

    use super::*;
    use crate::store::EmbeddedStore;
    use crate::store::fixtures::{K1, K1_OTHER_BYTES, K2, integration, put, put_integration, ring};

    fn account() -> AccountName {
        AccountName::from_id("42").unwrap()
    }

    fn scope(id: &str, integration: &str) -> PushScope {
        PushScope {
            name: PushScopeName::new(&account(), id).unwrap(),
            integration: IntegrationName::new(&account(), integration).unwrap(),
            target: ScopeTarget::Account,
            audience: Audience::All,
            action: PushAction::Push,
            create_time: UNIX_EPOCH,
            update_time: UNIX_EPOCH,
            revision: 0,
        }
    }

    /// Records over several pages: decoded, split by kind in key order, with the check record,
    /// the stale and the refused counted and the unreadable left out.
    #[tokio::test]
    async fn a_read_in_pages_decodes_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb"))
            .unwrap()
            .with_page_keys(2);
        let keys = ring(&format!("{K1}\n{K2}"));
        for id in ["a", "b", "e"] {
            put_integration(&store, &integration(id), &keys).await;
        }
        // Under the older key: stale. Under other bytes for the current key's id: refused.
        put_integration(&store, &integration("c"), &ring(K2)).await;
        put_integration(&store, &integration("d"), &ring(K1_OTHER_BYTES)).await;
        put(
            &store,
            keys::integration("42", "f"),
            b"not a record".to_vec(),
        )
        .await;
        for (id, integration) in [("s2", "b"), ("s1", "a")] {
            let s = scope(id, integration);
            put(
                &store,
                records::push_scope_key(&s.name),
                records::encode_push_scope(&s),
            )
            .await;
        }
        put(
            &store,
            keys::ENCRYPTION_CHECK.into(),
            records::encode_check(&keys),
        )
        .await;

        let snapshot = read(&store, &keys).await.unwrap();
        assert_eq!(snapshot.revision, store.revision().await.unwrap());
        let names: Vec<&str> = snapshot
            .integrations
            .iter()
            .map(|(_, i)| i.name.id())
            .collect();
        assert_eq!(names, ["a", "b", "c", "e"]);
        for (key, i) in &snapshot.integrations {
            assert_eq!(key, &records::integration_key(&i.name));
            assert_eq!(i.secrets[0].secret.expose(), "s3cret");
        }
        let scopes: Vec<&str> = snapshot
            .push_scopes
            .iter()
            .map(|(_, s)| s.name.id())
            .collect();
        assert_eq!(scopes, ["s1", "s2"]);
        assert_eq!(snapshot.stale, 1);
        assert_eq!(snapshot.refused, 1);
        assert!(
            matches!(&snapshot.refusal, Some(EncryptionError::Undecryptable { record, .. }) if record.ends_with("/integrations/d")),
            "{:?}",
            snapshot.refusal
        );
        assert_eq!(
            snapshot.check.map(|kv| kv.key),
            Some(keys::ENCRYPTION_CHECK.to_owned())
        );
    }
}
