//! The NBD frontend against the real clients: qemu-img and qemu-io, libnbd's nbdinfo and
//! nbdcopy, fio's nbd engine; and against a hostile client speaking raw bytes.
//!
//! The tools come from apt (`./scripts/test.sh` installs them). A test whose tool is missing
//! fails with a message saying so: it never passes without having run.

mod common;

use common::tool;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shadowcache_testkit::{NodeProcess, random_image, write_file};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uri(node: &NodeProcess, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        node.data_dir.join("nbd.sock").display()
    )
}

/// A sealed disk whose second MiB is zero, and a mutable one.
struct Fixture {
    _dir: tempfile::TempDir,
    node: NodeProcess,
    base: PathBuf,
    rw: PathBuf,
    metrics: u16,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let mut data = random_image(&base, 4 << 20, 31);
    data[1 << 20..2 << 20].fill(0);
    write_file(&base, &data);
    let rw = dir.path().join("rw.raw");
    random_image(&rw, 4 << 20, 32);
    let metrics = shadowcache_testkit::free_port();
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &[
            format!("--disk=base={},sealed", base.display()),
            format!("--disk=rw={},mutable", rw.display()),
            format!("--metrics=127.0.0.1:{metrics}"),
        ],
    );
    // The NBD socket comes up with the gRPC one; make sure.
    shadowcache_testkit::wait_for("the nbd socket", Duration::from_secs(10), || {
        UnixStream::connect(node.data_dir.join("nbd.sock")).ok()
    });
    Fixture {
        _dir: dir,
        node,
        base,
        rw,
        metrics,
    }
}

#[test]
fn qemu_reads_a_sealed_export_identical_and_writes_a_mutable_one() {
    let qemu_img = tool("qemu-img", "qemu-utils");
    let qemu_io = tool("qemu-io", "qemu-utils");
    let f = fixture();
    let out = run(Command::new(&qemu_img)
        .arg("compare")
        .args(["-f", "raw", "-F", "raw"])
        .arg(&f.base)
        .arg(uri(&f.node, "base")));
    assert!(out.contains("Images are identical"), "{out}");
    // Patterns written through NBD land in the origin; write-zeroes and flush too.
    run(Command::new(&qemu_io)
        .args(["-f", "raw"])
        .args([
            "-c",
            "write -P 0xab 4096 65536",
            "-c",
            "read -P 0xab 4096 65536",
            "-c",
            "write -z 1048576 131072",
            "-c",
            "read -P 0 1048576 131072",
            "-c",
            "write -P 0x5c -f 2097152 512",
            "-c",
            "read -P 0x5c 2097152 512",
            "-c",
            "flush",
        ])
        .arg(uri(&f.node, "rw")));
    let origin = std::fs::read(&f.rw).expect("origin");
    assert!(origin[4096..4096 + 65536].iter().all(|b| *b == 0xab));
    assert!(origin[1 << 20..(1 << 20) + 131072].iter().all(|b| *b == 0));
    assert!(origin[2 << 20..(2 << 20) + 512].iter().all(|b| *b == 0x5c));
    // A sealed export refuses writes; an unknown export is refused by name.
    let out = Command::new(&qemu_io)
        .args(["-f", "raw", "-c", "write -P 1 0 512"])
        .arg(uri(&f.node, "base"))
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("read-only")
            || text.contains("Operation not permitted")
            || !out.status.success(),
        "a write to a sealed export: {text}"
    );
    let out = Command::new(&qemu_img)
        .arg("info")
        .arg(uri(&f.node, "nope"))
        .output()
        .expect("qemu-img");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown export"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn libnbd_tools_list_the_disks_with_their_flags_and_copy_them_exactly() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let nbdcopy = tool("nbdcopy", "libnbd-bin");
    let f = fixture();
    let sock = f.node.data_dir.join("nbd.sock");
    let list = run(Command::new(&nbdinfo)
        .arg("--list")
        .arg(format!("nbd+unix:///?socket={}", sock.display())));
    assert!(
        list.contains("export=\"base\"") && list.contains("export=\"rw\""),
        "{list}"
    );
    let info = |export: &str| -> serde_json::Value {
        serde_json::from_str(&run(Command::new(&nbdinfo)
            .arg("--json")
            .arg(uri(&f.node, export))))
        .expect("nbdinfo json")
    };
    let base = info("base");
    let e = &base["exports"][0];
    assert_eq!(e["export-size"], 4 << 20, "{base}");
    assert_eq!(e["is_read_only"], true, "{base}");
    assert_eq!(e["can_multi_conn"], true, "{base}");
    assert_eq!(e["block_size_minimum"], 512, "{base}");
    assert_eq!(e["block_size_preferred"], 16384, "{base}");
    assert_eq!(e["block_size_maximum"], 32 << 20, "{base}");
    let rw = info("rw");
    let e = &rw["exports"][0];
    assert_eq!(e["is_read_only"], false, "{rw}");
    assert_eq!(e["can_fua"], true, "{rw}");
    assert_eq!(e["can_zero"], true, "{rw}");
    assert_eq!(e["can_flush"], true, "{rw}");
    let original = std::fs::read(&f.base).expect("base");
    for conns in ["1", "4"] {
        let out = f.node.data_dir.join(format!("copy-{conns}.raw"));
        run(Command::new(&nbdcopy)
            .arg(format!("--connections={conns}"))
            .arg(uri(&f.node, "base"))
            .arg(&out));
        assert!(
            std::fs::read(&out).expect("copy") == original,
            "nbdcopy with {conns} connections differs"
        );
    }
    // Once read, the zero MiB is reported as a hole that reads as zeroes.
    let map = run(Command::new(&nbdinfo)
        .arg("--map")
        .arg(uri(&f.node, "base")));
    assert!(
        map.lines()
            .any(|l| l.contains("1048576") && l.contains("hole")),
        "{map}"
    );
}

#[test]
fn fio_verifies_random_writes_and_reads_random_blocks() {
    let fio = tool("fio", "fio");
    let f = fixture();
    let sock = f.node.data_dir.join("nbd.sock");
    let job = |export: &str, rw: &str, extra: &[&str]| {
        // fio writes its verify state into its working directory: the test's, not the crate's.
        let out = run(Command::new(&fio)
            .current_dir(&f.node.data_dir)
            .arg("--name=t")
            .arg("--ioengine=nbd")
            .arg(format!(
                "--uri=nbd+unix:///{export}?socket={}",
                sock.display()
            ))
            .arg("--size=4m")
            .arg("--bs=4k")
            .arg(format!("--rw={rw}"))
            .arg("--iodepth=16")
            .arg("--output-format=json")
            .args(extra));
        let v: serde_json::Value =
            serde_json::from_str(&out[out.find('{').expect("json")..]).expect("fio json");
        v["jobs"][0].clone()
    };
    let w = job("rw", "randwrite", &["--verify=crc32c", "--do_verify=1"]);
    assert_eq!(w["error"], 0, "{w}");
    assert!(
        w["write"]["io_bytes"].as_u64().unwrap_or(0) >= 4 << 20,
        "{w}"
    );
    assert!(
        w["read"]["io_bytes"].as_u64().unwrap_or(0) >= 4 << 20,
        "verify read: {w}"
    );
    let r = job("base", "randread", &["--number_ios=2000"]);
    assert_eq!(r["error"], 0, "{r}");
    assert!(r["read"]["io_bytes"].as_u64().unwrap_or(0) > 0, "{r}");
}

/// A raw NBD client: greets, negotiates GO on `export`, and returns the socket.
fn raw_go(sock: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, 7, &data);
    loop {
        let (kind, _) = option_reply(&mut s);
        if kind == 1 {
            return s;
        }
        assert_eq!(kind, 3, "GO answered with {kind:#x}");
    }
}

fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).expect("option");
}

fn option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).expect("option reply data");
    (kind, d)
}

fn request(s: &mut UnixStream, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    s.write_all(&b).expect("request");
}

/// A simple reply: (error, cookie).
fn simple(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("reply");
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().expect("4")),
        0x6744_6698
    );
    (
        u32::from_be_bytes(h[4..8].try_into().expect("4")),
        u64::from_be_bytes(h[8..16].try_into().expect("8")),
    )
}

fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn a_hostile_client_gets_errors_or_a_closed_connection_and_the_node_serves_on() {
    let f = fixture();
    let sock = f.node.data_dir.join("nbd.sock");
    // Garbage instead of client flags and options.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    s.write_all(&0xffff_ffffu32.to_be_bytes())
        .expect("bad flags");
    assert!(
        closed(&mut s),
        "unknown client flags must end the connection"
    );
    // A truncated handshake, then the client vanishes.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.write_all(&[0, 0]).expect("half flags");
    drop(s);
    // An unknown option is answered UNSUP and negotiation goes on; an unknown export is named.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.read_exact(&mut hello).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    option(&mut s, 0x1234, b"whatever");
    assert_eq!(option_reply(&mut s).0, (1 << 31) + 1);
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"nope");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut s, 7, &go);
    assert_eq!(option_reply(&mut s).0, (1 << 31) + 6);
    // A malformed GO (its name length runs past the payload) is INVALID, not a crash.
    option(&mut s, 7, &[0, 0, 1, 0, b'x']);
    assert_eq!(option_reply(&mut s).0, (1 << 31) + 3);
    // An option payload too large to skip ends the connection.
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&b).expect("huge option");
    let (kind, _) = option_reply(&mut s);
    assert_eq!(kind, (1 << 31) + 9);
    assert!(closed(&mut s));

    // In transmission: unknown command, unknown flag, a read past the end, a write to a
    // sealed export, an oversized read: each an error reply; the connection lives on.
    let mut s = raw_go(&sock, "base");
    request(&mut s, 99, 0, 1, 0, 512);
    assert_eq!(simple(&mut s), (22, 1));
    request(&mut s, 0, 0x8000, 2, 0, 512);
    assert_eq!(simple(&mut s), (22, 2));
    request(&mut s, 0, 0, 3, (4 << 20) - 256, 512);
    assert_eq!(simple(&mut s), (22, 3));
    request(&mut s, 1, 0, 4, 0, 4);
    s.write_all(&[1, 2, 3, 4]).expect("payload");
    assert_eq!(simple(&mut s), (1, 4));
    // Over the maximum size: EINVAL (EOVERFLOW only answers DF, which needs structured replies).
    request(&mut s, 0, 0, 5, 0, 64 << 20);
    assert_eq!(simple(&mut s), (22, 5));
    request(&mut s, 0, 0, 6, 4096, 8);
    assert_eq!(simple(&mut s), (0, 6));
    let mut data = [0u8; 8];
    s.read_exact(&mut data).expect("read data");
    let original = std::fs::read(&f.base).expect("base");
    assert_eq!(&data[..], &original[4096..4104]);
    // A write to a mutable disk whose client vanishes half way through its payload.
    let mut s = raw_go(&sock, "rw");
    request(&mut s, 1, 0, 7, 0, 1 << 20);
    s.write_all(&[7u8; 1000]).expect("partial payload");
    drop(s);
    // The node still serves, and the disk did not take the torn write.
    let mut s = raw_go(&sock, "rw");
    request(&mut s, 0, 0, 8, 0, 1000);
    assert_eq!(simple(&mut s), (0, 8));
    let mut data = vec![0u8; 1000];
    s.read_exact(&mut data).expect("read");
    assert!(data != vec![7u8; 1000], "a torn write reached the disk");
    // TRIM is acknowledged and changes nothing (the protocol lets a server ignore it); past
    // the end it is EINVAL, not a write's ENOSPC.
    let before = std::fs::read(&f.rw).expect("rw");
    request(&mut s, 4, 0, 10, 0, 1 << 20);
    assert_eq!(simple(&mut s), (0, 10));
    request(&mut s, 4, 0, 11, before.len() as u64 - 512, 4096);
    assert_eq!(simple(&mut s), (22, 11));
    assert!(std::fs::read(&f.rw).expect("rw") == before, "a trim wrote");
    // DISC: no reply, the server closes.
    request(&mut s, 2, 0, 9, 0, 0);
    assert!(closed(&mut s));
    // Every request and every error reply was counted.
    let body = shadowcache_testkit::http_get(f.metrics, "/metrics").expect("metrics");
    let m = |name: &str| shadowcache_testkit::metric(&body, name).unwrap_or(0.0);
    assert!(
        m("shadowcache_nbd_errors_total{cmd=\"read\"}") >= 3.0,
        "{body}"
    );
    assert!(
        m("shadowcache_nbd_errors_total{cmd=\"write\"}") >= 1.0,
        "{body}"
    );
    assert!(
        m("shadowcache_nbd_errors_total{cmd=\"other\"}") >= 1.0,
        "{body}"
    );
    assert!(
        m("shadowcache_nbd_requests_total{cmd=\"read\"}") >= 5.0,
        "{body}"
    );
    assert!(
        m("shadowcache_nbd_bytes_total{cmd=\"read\"}") >= 1008.0,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detected_disk_reads_identical_and_takes_writes_through_a_non_owner() {
    use common::{Settings, client, until};
    let qemu_img = tool("qemu-img", "qemu-utils");
    let qemu_io = tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vdi.raw");
    random_image(&path, 2 << 20, 33);
    let (a, b, c) = common::vdi_cluster(dir.path(), &path, Settings::default(), &[]).await;
    // Reads from two members make the owner detect the disk.
    for m in [&b, &c] {
        let cl = client(m).await;
        for i in 0..5u64 {
            cl.disk("vdi").read_at(i * 4096, 4096).await.expect("read");
        }
    }
    until(&a, "vdi detected", |s| {
        s.disks
            .iter()
            .any(|d| d.id == "vdi" && d.mode == shadowcache_client::DiskMode::Detected as i32)
    })
    .await;
    until(&b, "vdi detected at b", |s| {
        s.disks
            .iter()
            .any(|d| d.id == "vdi" && d.mode == shadowcache_client::DiskMode::Detected as i32)
    })
    .await;
    // Through b's NBD socket, the whole disk reads identical to the origin.
    let (qi, qio, p) = (qemu_img.clone(), qemu_io.clone(), path.clone());
    let b_uri = uri(&b.process, "vdi");
    let c_uri = uri(&c.process, "vdi");
    tokio::task::spawn_blocking(move || {
        let out = run(Command::new(&qi)
            .arg("compare")
            .args(["-f", "raw", "-F", "raw"])
            .arg(&p)
            .arg(&b_uri));
        assert!(out.contains("Images are identical"), "{out}");
        // A write through b reaches the owner (ending the detection); c reads it back.
        run(Command::new(&qio)
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x6d 65536 16384",
                "-c",
                "flush",
            ])
            .arg(&b_uri));
        run(Command::new(&qio)
            .args(["-f", "raw", "-c", "read -P 0x6d 65536 16384"])
            .arg(&c_uri));
    })
    .await
    .expect("qemu");
    let origin = std::fs::read(&path).expect("origin");
    assert!(origin[65536..65536 + 16384].iter().all(|x| *x == 0x6d));
}

/// A child process killed when dropped (qemu-nbd, nbdkit).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(path: &Path) {
    shadowcache_testkit::wait_for("an nbd server's socket", Duration::from_secs(20), || {
        UnixStream::connect(path).ok()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_exports_are_origins_a_qcow2_through_qemu_nbd_and_a_writable_nbdkit_disk() {
    let qemu_img = tool("qemu-img", "qemu-utils");
    let qemu_io = tool("qemu-io", "qemu-utils");
    let qemu_nbd = tool("qemu-nbd", "qemu-utils");
    let nbdkit = tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let qcow = dir.path().join("img.qcow2");
    run(Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("6M"));
    run(Command::new(&qemu_io)
        .args(["-f", "qcow2"])
        .args([
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 2M 512k",
            "-c",
            "write -P 0x33 5000000 12345",
        ])
        .arg(&qcow));
    let expected = dir.path().join("expected.raw");
    run(Command::new(&qemu_img)
        .args(["convert", "-O", "raw"])
        .arg(&qcow)
        .arg(&expected));
    let qsock = dir.path().join("qemu-nbd.sock");
    let _qemu = Server(
        Command::new(&qemu_nbd)
            .args(["-r", "-t", "-e", "4", "-f", "qcow2", "-x", "img", "-k"])
            .arg(&qsock)
            .arg(&qcow)
            .spawn()
            .expect("qemu-nbd"),
    );
    let ksock = dir.path().join("nbdkit.sock");
    let _kit = Server(
        Command::new(&nbdkit)
            .args(["-f", "-U"])
            .arg(&ksock)
            .args(["memory", "4M"])
            .spawn()
            .expect("nbdkit"),
    );
    wait_socket(&qsock);
    wait_socket(&ksock);
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &[
            format!(
                "--disk=img=nbd+unix:///img?socket={},sealed",
                qsock.display()
            ),
            format!("--disk=mem=nbd+unix:///?socket={},mutable", ksock.display()),
        ],
    );
    let c = shadowcache_client::Client::connect_unix(&node.socket)
        .await
        .expect("connect");
    let want = std::fs::read(&expected).expect("expected");
    // Read through the cache twice (the second pass from RAM), and through the NBD frontend.
    for _ in 0..2 {
        let got = c
            .disk("img")
            .read_at(0, want.len() as u64)
            .await
            .expect("read img");
        assert!(
            got[..] == want[..],
            "a qcow2 behind qemu-nbd read differently"
        );
    }
    let n = node.data_dir.join("nbd.sock");
    let out = run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&expected)
        .arg(format!("nbd+unix:///img?socket={}", n.display())));
    assert!(out.contains("Images are identical"), "{out}");
    // The writable export takes writes and flushes, and reads them back.
    let d = c.disk("mem");
    d.write_at(123_456, vec![0x5au8; 70_000])
        .await
        .expect("write");
    d.flush().await.expect("flush");
    let got = d.read_at(123_000, 71_000).await.expect("read back");
    assert!(got[..456].iter().all(|b| *b == 0));
    assert!(got[456..70_456].iter().all(|b| *b == 0x5a));
    // A read-only export cannot be a mutable disk; a dead server is UNAVAILABLE.
    let err = c
        .register_disk(
            "ro",
            &format!("nbd+unix:///img?socket={}", qsock.display()),
            shadowcache_client::DiskMode::Mutable,
        )
        .await
        .expect_err("mutable over a read-only export");
    assert!(err.to_string().contains("read-only"), "{err}");
    drop(_kit);
    let err = d
        .read_at(0, 4096)
        .await
        .expect_err("read after nbdkit died");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
}

/// Issue 16, item 3: an NBD origin whose server went away after acknowledging writes, and
/// came back empty before a flush: the flush must fail (the writes were not made durable), not
/// succeed on the new connection; the flush after it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_a_lost_nbd_connection_reports_the_unflushed_writes() {
    let nbdkit = tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let ksock = dir.path().join("nbdkit.sock");
    let start = || {
        // A killed server leaves its socket file behind.
        let _ = std::fs::remove_file(&ksock);
        let s = Server(
            Command::new(&nbdkit)
                .args(["-f", "-U"])
                .arg(&ksock)
                .args(["memory", "4M"])
                .spawn()
                .expect("nbdkit"),
        );
        wait_socket(&ksock);
        s
    };
    let kit = start();
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &[format!(
            "--disk=mem=nbd+unix:///?socket={},mutable",
            ksock.display()
        )],
    );
    let c = shadowcache_client::Client::connect_unix(&node.socket)
        .await
        .expect("connect");
    let d = c.disk("mem");
    d.write_at(0, vec![1u8; 4096]).await.expect("write");
    d.flush().await.expect("a flush that covers the write");
    d.write_at(4096, vec![2u8; 4096]).await.expect("write");
    drop(kit);
    let _kit = start();
    let err = d
        .flush()
        .await
        .expect_err("a flush after the writes were lost");
    assert!(err.to_string().contains("may not be durable"), "{err}");
    d.flush().await.expect("the next flush");
}

/// Issue 16, item 3: one NBD export under two names is one origin: the same socket through a
/// symlink, and the same TCP server as `localhost` and as `127.0.0.1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nbd_export_named_two_ways_is_one_origin() {
    let nbdkit = tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("kit.sock");
    let _unix = Server(
        Command::new(&nbdkit)
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "1M"])
            .spawn()
            .expect("nbdkit"),
    );
    let port = shadowcache_testkit::free_port();
    let _tcp = Server(
        Command::new(&nbdkit)
            .args(["-f", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["memory", "1M"])
            .spawn()
            .expect("nbdkit"),
    );
    wait_socket(&sock);
    shadowcache_testkit::wait_for("nbdkit on tcp", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let link = dir.path().join("alias.sock");
    std::os::unix::fs::symlink(&sock, &link).expect("symlink");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let c = shadowcache_client::Client::connect_unix(&node.socket)
        .await
        .expect("connect");
    let m = shadowcache_client::DiskMode::Mutable;
    c.register_disk("one", &format!("nbd+unix:///?socket={}", sock.display()), m)
        .await
        .expect("the export");
    let err = c
        .register_disk("two", &format!("nbd+unix:///?socket={}", link.display()), m)
        .await
        .expect_err("the same export through a symlink");
    assert!(
        err.to_string()
            .contains("already the origin of disk \"one\""),
        "{err}"
    );
    c.register_disk("three", &format!("nbd://127.0.0.1:{port}"), m)
        .await
        .expect("the tcp export");
    let err = c
        .register_disk("four", &format!("nbd://localhost:{port}"), m)
        .await
        .expect_err("the same export as localhost");
    assert!(
        err.to_string()
            .contains("already the origin of disk \"three\""),
        "{err}"
    );
}

#[test]
fn the_kernel_client_reads_an_export_identical_when_the_nbd_module_is_there() {
    if !Path::new("/dev/nbd0").exists() {
        eprintln!(
            "\n*** SKIPPED: /dev/nbd0 is missing (no `nbd` kernel module on this machine): \
             the kernel nbd-client test did not run ***\n"
        );
        return;
    }
    let nbd_client = tool("nbd-client", "nbd-client");
    let f = fixture();
    let sock = f.node.data_dir.join("nbd.sock");
    run(Command::new(&nbd_client)
        .arg("-unix")
        .arg(&sock)
        .arg("/dev/nbd0")
        .args(["-N", "base"]));
    let got = std::fs::read("/dev/nbd0");
    let _ = Command::new(&nbd_client).args(["-d", "/dev/nbd0"]).status();
    let got = got.expect("read /dev/nbd0");
    assert!(
        got == std::fs::read(&f.base).expect("base"),
        "the kernel read different bytes"
    );
}
