//! `shadowcache-node` as a systemd service runs it (issue 19, item 2): readiness, reload and
//! stop over the real sd_notify protocol (a datagram socket named by `NOTIFY_SOCKET`), and
//! SIGHUP reloading the log filter from the config file, refusing a broken one, and leaving
//! the node serving.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shadowcache_testkit::binary;

fn datagrams(sock: &UnixDatagram, until: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut all = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            all.push('\n');
            if all.contains(until) {
                break;
            }
        }
    }
    all
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn readiness_reload_and_stop_reach_systemd_and_sighup_reloads_the_log_filter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let notify = d.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let image = d.join("base.raw");
    std::fs::write(&image, vec![7u8; 1 << 16]).expect("image");
    let config = d.join("node.toml");
    let write_config = |filter: &str| {
        std::fs::write(
            &config,
            format!(
                "node_id = \"n1\"\nlog_filter = {filter:?}\n[cache]\nssd = 0\n\
                 [[disk]]\nid = \"base\"\norigin = {:?}\nmode = \"sealed\"\n",
                image.display().to_string()
            ),
        )
        .expect("config");
    };
    write_config("warn");
    let log = d.join("node.log");
    let mut child = Command::new(binary("shadowcache-node"))
        .arg(format!("--config={}", config.display()))
        .arg(format!("--data-dir={}", d.join("data").display()))
        .env("NOTIFY_SOCKET", &notify)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start shadowcache-node");
    let pid = child.id();
    let got = datagrams(&sock, "READY=1", Duration::from_secs(30));
    assert!(got.contains("READY=1"), "no readiness: {got:?}");
    assert!(got.contains("STATUS=serving 1 disk(s) as n1"), "{got:?}");
    let log_text = || {
        let mut s = String::new();
        std::fs::File::open(&log)
            .expect("log")
            .read_to_string(&mut s)
            .expect("read log");
        s
    };
    // At `warn`, the info line a reload writes is not shown; at `info` it is.
    write_config("info");
    signal(pid, "-HUP");
    let got = datagrams(&sock, "READY=1", Duration::from_secs(10));
    assert!(
        got.contains("RELOADING=1") && got.contains("READY=1"),
        "{got:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log_text().contains("SIGHUP: log filter reloaded") {
        assert!(
            Instant::now() < deadline,
            "no reload logged: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A broken file is refused, said at error level, and the node goes on.
    std::fs::write(&config, "log_filter = [broken").expect("config");
    signal(pid, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log_text().contains("the configuration has an error; nothing reloaded") {
        assert!(Instant::now() < deadline, "{}", log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.try_wait().expect("wait").is_none(), "the node died");
    assert!(d.join("data/shadowcache.sock").exists());
    // A log that is not a terminal (journald, `docker logs`, this file) has no colour codes.
    assert!(
        !log_text().contains('\u{1b}'),
        "ANSI escapes in a log file: {:?}",
        log_text()
    );
    signal(pid, "-TERM");
    let got = datagrams(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(got.contains("STOPPING=1"), "{got:?}");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}\n{}", log_text());
}
