//! Compiles `adce/v1/*.proto` with protox (pure Rust, no protoc) and writes
//! the generated code plus a descriptor set for gRPC reflection to `OUT_DIR`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "adce/v1/types.proto",
    "adce/v1/agent.proto",
    "adce/v1/control.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out_dir.join("adce_descriptor.bin"), descriptor_bytes)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `AgentGateway.Connect` would clash with the generated `connect`
        // constructor; clients build a `Channel` and call `new` instead.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
