//! What the store's unit tests share: keys, an integration with secrets, a raw write.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use pushwire_common::domain::{
    AccountName, AuthHeader, Integration, IntegrationName, Secret, SigningSecret,
};

use super::{Op, Store, Txn, records};
use crate::crypto::Keyring;

pub const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// The id of [`K1`] with other bytes.
pub const K1_OTHER_BYTES: &str = "k1:HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";
pub const K2: &str = "k2:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

/// The keys of `text`, lines of `id:base64`.
pub fn ring(text: &str) -> Arc<Keyring> {
    Arc::new(Keyring::parse(text, "test").unwrap())
}

/// Integration `id` of account 42 as the API creates it (at the epoch), with the auth header
/// `Bearer t0ken` and the secret `s3cret`.
pub fn integration(id: &str) -> Integration {
    let account = AccountName::from_id("42").unwrap();
    Integration {
        display_name: id.into(),
        url: "https://crm.example.com/hook".into(),
        auth_header: Some(AuthHeader {
            name: "Authorization".into(),
            value: Secret::new("Bearer t0ken"),
        }),
        secrets: vec![SigningSecret {
            secret: Secret::new("s3cret"),
            expire_time: None,
        }],
        ..Integration::new(IntegrationName::new(&account, id).unwrap(), UNIX_EPOCH)
    }
}

/// Writes `i` as its record, its secrets encrypted with `keys`.
pub async fn put_integration(store: &dyn Store, i: &Integration, keys: &Keyring) {
    let value = records::encode_integration(i, keys);
    put(store, records::integration_key(&i.name), value).await;
}

/// Writes `value` at `key`.
pub async fn put(store: &dyn Store, key: String, value: Vec<u8>) {
    let txn = Txn {
        compares: vec![],
        ops: vec![Op::Put { key, value }],
    };
    store.txn(txn).await.unwrap();
}
