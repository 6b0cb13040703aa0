//! Frontends: the protocols clients speak to a node. They translate requests into [`crate::Node`]
//! calls and errors into protocol codes; they hold no cache or disk logic.
//!
//! Architecture invariant: the node never imports a frontend; `server.rs`, the composition root,
//! wires them.

pub mod conn;
pub mod grpc;
pub mod peer;
pub mod peer_auth;
pub mod peer_client;
pub mod status;
pub mod tls;
