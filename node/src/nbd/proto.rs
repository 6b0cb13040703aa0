//! NBD wire format: the constants of the protocol (NetworkBlockDevice/nbd `doc/proto.md`) and
//! pure encoders and decoders, so that the parsing can be tested and fuzzed without sockets.
//!
//! Architecture invariant: no I/O; a decoder returns an error on malformed input, never panics.

use bytes::{BufMut, Bytes, BytesMut};

/// "NBDMAGIC".
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// No 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// NBD_OPT_STARTTLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe and select an export.
pub const OPT_GO: u32 = 7;
/// Structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export of a list.
pub const REP_SERVER: u32 = 2;
/// An information item.
pub const REP_INFO: u32 = 3;
/// A metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// NBD_REP_ERR_TLS_REQD: the server requires TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// Request too big.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// Information types.
pub const INFO_EXPORT: u16 = 0;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
/// Read-only export.
pub const TF_READ_ONLY: u16 = 2;
/// FLUSH supported.
pub const TF_SEND_FLUSH: u16 = 4;
/// FUA supported.
pub const TF_SEND_FUA: u16 = 8;
/// TRIM supported.
pub const TF_SEND_TRIM: u16 = 32;
/// WRITE_ZEROES supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 64;
/// DF supported.
pub const TF_SEND_DF: u16 = 128;
/// Several connections see each other's flushed writes.
pub const TF_CAN_MULTI_CONN: u16 = 256;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (served as write zeroes).
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMDF_FUA: u16 = 1;
/// Do not punch a hole (write zeroes).
pub const CMDF_NO_HOLE: u16 = 2;
/// Do not fragment (read).
pub const CMDF_DF: u16 = 4;
/// One extent only (block status).
pub const CMDF_REQ_ONE: u16 = 8;
/// Every command flag we understand.
pub const CMDF_KNOWN: u16 = CMDF_FUA | CMDF_NO_HOLE | CMDF_DF | CMDF_REQ_ONE;

/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1;

/// `base:allocation` states.
pub const STATE_HOLE: u32 = 1;
/// Reads as zeroes.
pub const STATE_ZERO: u32 = 2;

/// Errors (errno values on the wire).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Invalid request.
pub const EINVAL: u32 = 22;
/// No space (write past the end).
pub const ENOSPC: u32 = 28;
/// Too large.
pub const EOVERFLOW: u32 = 75;
/// Unsupported.
pub const ENOTSUP: u32 = 95;
/// Shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Longest export name or option string accepted.
pub const MAX_STRING: usize = 4096;
/// Largest option payload accepted.
pub const MAX_OPTION: u32 = 64 << 10;
/// Largest request payload (read or write length) accepted.
pub const MAX_REQUEST: u32 = 32 << 20;
/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// A transmission request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub cmd: u16,
    /// Echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// Size of a request header.
pub const REQUEST_BYTES: usize = 28;

impl Request {
    /// Decodes a header; `None` when the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_BYTES]) -> Option<Request> {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        if u32_at(0) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            cmd: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64_at(8),
            offset: u64_at(16),
            len: u32_at(24),
        })
    }

    /// Encodes it (the client side).
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// An option reply: header and data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// A simple reply header (data, if any, follows).
pub fn simple_reply(cookie: u64, error: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    b.freeze()
}

/// A structured reply chunk header for a payload of `len` bytes (the payload follows).
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(20 + 12);
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(len);
    b
}

/// A structured error chunk (final).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Bytes {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut b = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    );
    b.put_u32(error);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    b.freeze()
}

/// Reads a length-prefixed string from an option payload at `*at`.
pub fn take_string(data: &[u8], at: &mut usize) -> Option<String> {
    let len = u32::from_be_bytes(data.get(*at..*at + 4)?.try_into().ok()?) as usize;
    *at += 4;
    if len > MAX_STRING {
        return None;
    }
    let s = data.get(*at..*at + len)?;
    *at += len;
    String::from_utf8(s.to_vec()).ok()
}

/// The export name and the information items asked for in an INFO or GO payload.
pub fn parse_go(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut at = 0;
    let name = take_string(data, &mut at)?;
    let n = u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?) as usize;
    at += 2;
    let mut infos = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        infos.push(u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?));
        at += 2;
    }
    (at == data.len()).then_some((name, infos))
}

/// The export name and the queries of a LIST_ or SET_META_CONTEXT payload.
pub fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut at = 0;
    let name = take_string(data, &mut at)?;
    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4;
    if n > 64 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(take_string(data, &mut at)?);
    }
    (at == data.len()).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_request_round_trips_and_a_bad_magic_is_refused() {
        let r = Request {
            flags: CMDF_FUA,
            cmd: CMD_WRITE,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let mut b = r.encode();
        b[0] ^= 1;
        assert_eq!(Request::decode(&b), None);
    }

    #[test]
    fn go_and_meta_payloads_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        assert_eq!(
            parse_go(&d),
            Some(("disk".into(), vec![INFO_BLOCK_SIZE, INFO_EXPORT]))
        );
        assert_eq!(parse_go(&d[..d.len() - 1]), None, "truncated");
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta(&m),
            Some((String::new(), vec![BASE_ALLOCATION.to_string()]))
        );
    }

    proptest! {
        #[test]
        fn option_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_go(&data);
            let _ = parse_meta(&data);
            let mut at = 0;
            let _ = take_string(&data, &mut at);
        }

        #[test]
        fn request_decoding_never_panics(data in proptest::collection::vec(any::<u8>(), REQUEST_BYTES)) {
            let b: [u8; REQUEST_BYTES] = data.try_into().expect("28 bytes");
            if let Some(r) = Request::decode(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }
    }
}
