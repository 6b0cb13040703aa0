//! Frontends: the protocols clients speak to a node. They translate requests into [`crate::Node`]
//! calls and errors into protocol codes; they hold no cache or disk logic.

pub mod grpc;
pub mod peer;
pub mod peer_client;
pub mod status;
pub mod tls;
