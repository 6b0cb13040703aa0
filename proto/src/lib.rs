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

/// What a certificate of the cluster's CA may do, named in it as a URI subject alternative name
/// `urn:shadowcache:role:NAME` (`shadowcache certs issue --role`). A certificate that names no
/// role (issued before roles) may do everything, unless the node sets
/// `cluster.tls.require_roles`: then only what a client's may.
pub mod role {
    /// The prefix of the role URI.
    pub const URI_PREFIX: &str = "urn:shadowcache:role:";
    /// A node: the Peer service, gossip, and the Block service of other nodes (not Admin).
    pub const MEMBER: &str = "member";
    /// A program reading and writing disks over `listen_tcp`: the Block service only.
    pub const CLIENT: &str = "client";
    /// An operator: the Block and Admin services over `listen_tcp`.
    pub const ADMIN: &str = "admin";
    /// Every role, in the order the CLI lists them.
    pub const ALL: [&str; 3] = [MEMBER, CLIENT, ADMIN];
    /// The prefix of the URI naming the one node a member's certificate speaks for
    /// (`urn:shadowcache:node:ID`): calls that say they come from another node are refused. A
    /// certificate several nodes share names none.
    pub const NODE_URI_PREFIX: &str = "urn:shadowcache:node:";
}
