//! Generated storage records (package `pushwire.storage.v1`, the values under `/pushwire/v1/`
//! in the store), compiled here rather than in `pushwire_common` because only the control plane
//! stores them; plus the hand-written `Debug` of [`EncryptedValue`], which prints no bytes.

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

include!(concat!(env!("OUT_DIR"), "/pushwire.storage.v1.rs"));

impl std::fmt::Debug for EncryptedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedValue")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}
