//! The one map between [`Error`] and `tonic::Status`, in both directions.
//!
//! Out: the status code is the error kind's [`Code`], the message its text, and the kind
//! itself travels in the `shadowcache-error-kind` metadata entry. Back: a status with that
//! entry becomes [`Error::Remote`] with the same kind and message, so an error passes through
//! a member unchanged (a refused lease stays a refused lease; it does not turn into "sealed").
//! A status without it (a transport failure, a deadline, a stranger) is the member being
//! unavailable: [`Error::Peer`].
//!
//! Architecture invariant: the only place where node errors and gRPC codes meet.

use tonic::Status;

use crate::error::{Code, Error, ErrorKind};

/// The metadata key that carries an error's kind.
pub const KIND_KEY: &str = "shadowcache-error-kind";

/// A [`Code`] as gRPC's.
pub fn to_grpc(c: Code) -> tonic::Code {
    match c {
        Code::NotFound => tonic::Code::NotFound,
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::AlreadyExists => tonic::Code::AlreadyExists,
        Code::OutOfRange => tonic::Code::OutOfRange,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::Internal => tonic::Code::Internal,
        Code::Aborted => tonic::Code::Aborted,
        Code::DataLoss => tonic::Code::DataLoss,
    }
}

/// A node error as the status a client receives.
pub fn status(e: &Error) -> Status {
    let mut s = Status::new(to_grpc(e.code()), e.to_string());
    if let Ok(v) = e.kind().as_str().parse() {
        s.metadata_mut().insert(KIND_KEY, v);
    }
    s
}

/// A status member `node` answered a request about `disk` with, as a node error.
pub fn from_status(node: &str, disk: &str, s: &Status) -> Error {
    let kind = s
        .metadata()
        .get(KIND_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::parse)
        // Only a kind whose code is the status's: anything else is not our answer.
        .filter(|k| to_grpc(k.code()) == s.code());
    match kind {
        Some(kind) => Error::Remote {
            node: node.to_string(),
            kind,
            message: s.message().chars().take(4096).collect(),
        },
        None => Error::Peer {
            node: node.to_string(),
            cause: format!(
                "{:?}: {}{}",
                s.code(),
                s.message().chars().take(4096).collect::<String>(),
                if disk.is_empty() {
                    String::new()
                } else {
                    format!(" (disk {disk:?})")
                }
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(kind: ErrorKind) -> Error {
        match kind {
            ErrorKind::UnknownDisk => Error::UnknownDisk("d".into()),
            ErrorKind::InvalidDiskId => Error::InvalidDiskId("..".into()),
            ErrorKind::DiskExists => Error::DiskExists("d".into()),
            ErrorKind::OutOfRange => Error::OutOfRange {
                disk: "d".into(),
                offset: 10,
                len: 5,
                size: 12,
            },
            ErrorKind::TooLarge => Error::TooLarge { len: 9, max: 8 },
            ErrorKind::Sealed => Error::Sealed("d".into()),
            ErrorKind::Unseal => Error::Unseal("d".into()),
            ErrorKind::Invalid => Error::Invalid("why".into()),
            ErrorKind::Origin => Error::Origin(crate::origin::OriginError::Open {
                origin: "/x".into(),
                cause: "gone".into(),
            }),
            ErrorKind::StaleGeneration => Error::StaleGeneration {
                disk: "d".into(),
                asked: 1,
                current: 2,
            },
            ErrorKind::Peer => Error::Peer {
                node: "b".into(),
                cause: "down".into(),
            },
            ErrorKind::NoLease => Error::NoLease {
                disk: "d".into(),
                why: "not detected".into(),
            },
            ErrorKind::State => Error::State("disk full".into()),
            ErrorKind::Late => Error::Late {
                disk: "d".into(),
                late_ms: 3,
            },
            ErrorKind::LostWrites => Error::LostWrites("the owner's host restarted".into()),
            ErrorKind::Disputed => Error::Disputed {
                disk: "d".into(),
                owners: vec!["a".into(), "b".into()],
            },
        }
    }

    #[test]
    fn every_error_kind_survives_the_trip_to_a_member_and_back_with_its_code_and_message() {
        for kind in ErrorKind::ALL {
            let e = example(kind);
            assert_eq!(e.kind(), kind);
            let s = status(&e);
            assert_eq!(s.code(), to_grpc(kind.code()), "{kind:?}");
            let back = from_status("a", "d", &s);
            assert_eq!(back.kind(), kind, "{kind:?} came back as {back:?}");
            assert_eq!(back.code(), e.code());
            assert_eq!(back.to_string(), e.to_string());
            // And once more through a second member: nothing changes.
            let again = from_status("b", "d", &status(&back));
            assert_eq!(again.kind(), kind);
            assert_eq!(again.to_string(), e.to_string());
        }
    }

    #[test]
    fn a_refused_lease_comes_back_as_a_refused_lease_not_as_sealed() {
        let e = Error::NoLease {
            disk: "d".into(),
            why: "it is mutable".into(),
        };
        let back = from_status("a", "d", &status(&e));
        assert_eq!(back.kind(), ErrorKind::NoLease);
        assert!(back.to_string().contains("no lease"), "{back}");
    }

    #[test]
    fn a_status_without_our_kind_or_with_a_mismatched_code_is_an_unavailable_member() {
        let plain = Status::unavailable("connection refused");
        assert_eq!(from_status("a", "d", &plain).kind(), ErrorKind::Peer);
        let mut liar = Status::not_found("no such disk");
        liar.metadata_mut()
            .insert(KIND_KEY, "sealed".parse().expect("ascii"));
        assert_eq!(from_status("a", "d", &liar).kind(), ErrorKind::Peer);
        let mut junk = Status::internal("x");
        junk.metadata_mut()
            .insert(KIND_KEY, "no_such_kind".parse().expect("ascii"));
        assert_eq!(from_status("a", "d", &junk).kind(), ErrorKind::Peer);
    }
}
