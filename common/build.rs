//! Compiles `proto/` with the pure-Rust `protox` compiler (no system `protoc`), generates the
//! prost/tonic bindings and writes the descriptor set that gRPC server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "pushwire/v1/integrations.proto",
    "pushwire/v1/push_scopes.proto",
    "pushwire/v1/ingest.proto",
    "pushwire/v1/config.proto",
    "pushwire/v1/deliveries.proto",
];

/// Messages that carry secrets: their `Debug` is written by hand in `pb.rs` and redacts them.
const REDACTED_DEBUG: &[&str] = &[
    ".pushwire.v1.Integration",
    ".pushwire.v1.AuthHeader",
    ".pushwire.v1.IntegrationConfig",
    ".pushwire.v1.SigningSecret",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("pushwire_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .skip_debug(REDACTED_DEBUG)
        // prost's codec, except that a Publish request whose document is not UTF-8 is
        // refused on its own rather than ending the stream (`pb/codec.rs`).
        .codec_path("crate::pb::codec::PushwireCodec")
        .compile_fds(fds)?;
    Ok(())
}
