//! Peer calls signed under the cluster key (`cluster.secret_file`): without TLS, the key is what
//! tells a member's call from a stranger's.
//!
//! Every call carries `shadowcache-peer-auth-bin`: a send time, a nonce and a keyed BLAKE3 tag
//! under a sub key of the cluster key (not the gossip one), sealed and checked as gossip
//! datagrams are ([`crate::cluster::gossip_auth::Sealer`]: 30 s window, nonces remembered). A
//! call without a valid one is refused with UNAUTHENTICATED and counted in
//! `shadowcache_peer_calls_refused_total`. The tag does not cover the message: against an
//! attacker on the path, use `[cluster.tls]`.
//!
//! Architecture invariant: with a key, no Peer handler runs for a call that did not pass.

use std::sync::Arc;

use tonic::metadata::BinaryMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::cluster::gossip_auth::{ClusterKey, Sealer, now_ms};

/// The metadata key.
pub const HEADER: &str = "shadowcache-peer-auth-bin";
const CONTEXT: &str = "shadowcache 2026 peer call key";

/// Signs this node's Peer calls (a no-op without a key).
#[derive(Debug, Clone, Default)]
pub struct SignCalls {
    sealer: Option<Arc<Sealer>>,
}

impl SignCalls {
    /// Signs under `key`, or not at all.
    pub fn new(key: Option<&ClusterKey>) -> Self {
        SignCalls {
            sealer: key.map(|k| Arc::new(Sealer::with_context(k, CONTEXT))),
        }
    }
}

impl Interceptor for SignCalls {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(s) = &self.sealer {
            let sealed = s.seal(&[], now_ms(), rand::random());
            req.metadata_mut()
                .insert_bin(HEADER, BinaryMetadataValue::from_bytes(&sealed));
        }
        Ok(req)
    }
}

/// Checks the signature of calls to this node's Peer service (lets all through without a key).
#[derive(Debug, Clone, Default)]
pub struct CheckCalls {
    sealer: Option<Arc<Sealer>>,
    /// `cluster.tls.require_roles`: a certificate that names no role is not a member's.
    require_roles: bool,
}

impl CheckCalls {
    /// Checks under `key`, or not at all; over TLS, certificates' roles with
    /// `cluster.tls.require_roles` set to `require_roles`.
    pub fn new(key: Option<&ClusterKey>, require_roles: bool) -> Self {
        CheckCalls {
            sealer: key.map(|k| Arc::new(Sealer::with_context(k, CONTEXT))),
            require_roles,
        }
    }
}

impl Interceptor for CheckCalls {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        // Over TLS: a node's certificate only (a client's or an operator's may not act as a
        // member).
        if let Some(roles) = super::conn::roles(&req).map(|r| r.under(self.require_roles))
            && !roles.may_peer()
        {
            metrics::counter!(crate::telemetry::ROLE_REFUSED, "rpc" => "peer").increment(1);
            return Err(Status::permission_denied(format!(
                "peer call refused: this certificate's role is {}; the Peer service needs a member's (`shadowcache certs issue --role member`)",
                roles.describe()
            )));
        }
        let Some(s) = &self.sealer else {
            return Ok(req);
        };
        let refuse = |why: &'static str| {
            metrics::counter!(crate::telemetry::PEER_CALLS_REFUSED, "reason" => why).increment(1);
            Status::unauthenticated(format!(
                "peer call refused: {why} (members sign their calls under cluster.secret_file)"
            ))
        };
        let value = req
            .metadata()
            .get_bin(HEADER)
            .ok_or_else(|| refuse("no signature"))?;
        let bytes = value
            .to_bytes()
            .map_err(|_| refuse("malformed signature"))?;
        match s.open(&bytes, now_ms()) {
            Ok(_) => Ok(req),
            Err(crate::cluster::gossip_auth::Rejected::BadTag) => Err(refuse("wrong key")),
            Err(crate::cluster::gossip_auth::Rejected::Stale) => Err(refuse("stale signature")),
            Err(crate::cluster::gossip_auth::Rejected::Replay) => Err(refuse("replayed signature")),
            Err(
                crate::cluster::gossip_auth::Rejected::Malformed
                | crate::cluster::gossip_auth::Rejected::Untrusted
                | crate::cluster::gossip_auth::Rejected::Throttled
                | crate::cluster::gossip_auth::Rejected::WrongRole,
            ) => Err(refuse("malformed signature")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_calls_pass_once_and_others_are_refused() {
        let key = ClusterKey::from_secret(b"a cluster secret of enough bytes").expect("key");
        let other = ClusterKey::from_secret(b"another secret of enough bytes!!").expect("key");
        let mut check = CheckCalls::new(Some(&key), false);
        let signed = SignCalls::new(Some(&key))
            .call(Request::new(()))
            .expect("sign");
        let replay = signed.metadata().clone();
        assert!(check.call(signed).is_ok());
        let mut again = Request::new(());
        *again.metadata_mut() = replay;
        assert_eq!(
            check.call(again).expect_err("a replay").code(),
            tonic::Code::Unauthenticated
        );
        let foreign = SignCalls::new(Some(&other))
            .call(Request::new(()))
            .expect("sign");
        assert!(check.call(foreign).is_err(), "another key");
        assert!(check.call(Request::new(())).is_err(), "no signature");
        assert!(
            CheckCalls::new(None, false).call(Request::new(())).is_ok(),
            "no key: open"
        );
    }
}
