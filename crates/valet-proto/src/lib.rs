//! The wire contract of valetd, generated from `proto/valet/v1` at build time.

/// Messages and services of package `valet.v1`.
pub mod v1 {
    tonic::include_proto!("valet.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("valet_descriptor");
