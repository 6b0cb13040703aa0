//! The gRPC contract of shadowcache, package `shadowcache.v1`.
//!
//! `shadowcache.proto` beside this crate is the source of truth; this crate only compiles it.
//! Every `bytes` field is generated as `bytes::Bytes`, so a block received from the wire is a
//! slice of the receive buffer, never a copy.

#![allow(missing_docs, clippy::all)]

/// Version 1 of the protocol: messages, clients and servers for every service.
pub mod v1 {
    tonic::include_proto!("shadowcache.v1");
}

pub use v1::*;

/// Largest payload one Read or Write request may carry. Larger ranges are split by the client.
pub const MAX_IO_BYTES: u64 = 16 * 1024 * 1024;

/// tonic encode/decode limit: the largest payload plus room for the envelope.
pub const MAX_MESSAGE_BYTES: usize = MAX_IO_BYTES as usize + 64 * 1024;
