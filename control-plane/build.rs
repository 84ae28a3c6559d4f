//! Compiles the storage records (`proto/pushwire/storage/v1/records.proto`) with the pure-Rust
//! `protox` compiler (no system `protoc`). The records are the control plane's alone: the API
//! types they use (`pushwire.v1`) come from `pushwire_common::pb`, and nothing else sees them.

use std::path::PathBuf;

const RECORDS: &str = "pushwire/storage/v1/records.proto";

/// Messages whose `Debug` is written by hand in `src/store/pb.rs` (it prints no ciphertext).
const REDACTED_DEBUG: &[&str] = &[".pushwire.storage.v1.EncryptedValue"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    // The imports stay in the set (prost reads their messages to derive traits); no code is
    // generated for them: `pushwire.v1` is an extern path, the well-known types are prost-types.
    let fds = protox::compile([RECORDS], [&root])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .extern_path(".pushwire.v1", "::pushwire_common::pb::v1")
        .skip_debug(REDACTED_DEBUG)
        .compile_fds(fds)?;
    Ok(())
}
