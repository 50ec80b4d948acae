//! Wire types of adce's gRPC API, generated from `proto/adce/v1`: the
//! `AgentGateway` service agents connect to and the `Control` service adcectl
//! uses. Wire types only (conversions to domain types live in the crates that
//! own those types), plus [`dial`]: the one way clients reach the server,
//! and the lowercase task state names every crate spells the same way
//! (`v1::TaskState::name`). With the `runtime` feature, [`runtime`]: the
//! logging setup and systemd notifications the server and agent binaries
//! share.

pub mod dial;
mod names;
#[cfg(feature = "runtime")]
pub mod runtime;

/// Version 1 of the adce protocol.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("adce.v1");

    /// The encoded `FileDescriptorSet` of every adce proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/adce_descriptor.bin"));
}
