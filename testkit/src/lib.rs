//! Test support shared by shadowcache's integration tests: images of known bytes, real
//! `shadowcache-node` processes, and polling with a deadline instead of sleeps.
//!
//! Every spawned process is killed when its guard drops, also when a test panics.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// Writes `size` bytes of seeded random data to `path` and returns them.
pub fn random_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill(&mut data[..]);
    write_file(path, &data);
    data
}

/// Writes `data` to `path`, creating parent directories.
pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("create image directory");
    }
    let mut f = std::fs::File::create(path).expect("create image");
    f.write_all(data).expect("write image");
    f.sync_all().expect("sync image");
}

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`),
/// found from the running test executable (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary directory");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("profile directory")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// A workspace binary by name. Panics with instructions if it has not been built: `cargo test
/// --workspace` builds every binary before any test runs.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build it: cargo build -p the crate that has it)",
        p.display()
    );
    p
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `GET path` on 127.0.0.1:`port`; the whole response when the status is 200.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// The value of the Prometheus sample `name` (with its labels, exactly as exported) in `body`.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A port free for both TCP and UDP on 127.0.0.1 (a node's peer address uses both).
pub fn free_peer_port() -> u16 {
    for _ in 0..100 {
        let Ok(tcp) = std::net::TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = tcp.local_addr().map(|a| a.port()) else {
            continue;
        };
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP on 127.0.0.1");
}

/// Pseudo environment variable of [`NodeProcess::start_with_env`]: run the node under this
/// descriptor limit (soft and hard), through util-linux `prlimit`.
pub const NOFILE_LIMIT: &str = "TESTKIT_NOFILE_LIMIT";

/// Pseudo environment variable of [`NodeProcess::start_with_env`]: run the node in this
/// network namespace (`ip netns exec`, which needs root; the namespace must exist).
pub const NETNS: &str = "TESTKIT_NETNS";

/// A running `shadowcache-node` process with its own data directory.
#[derive(Debug)]
pub struct NodeProcess {
    child: Option<Child>,
    /// The data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// The gRPC Unix socket.
    pub socket: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl NodeProcess {
    /// Starts a node on `data_dir` with extra `args` and waits until its socket accepts.
    pub fn start(data_dir: &Path, args: &[String]) -> NodeProcess {
        Self::start_with_env(data_dir, args, &[])
    }

    /// [`NodeProcess::start`] with extra environment variables (fault injection). The pseudo
    /// variable [`NOFILE_LIMIT`] is not passed on: the node runs under `prlimit` with that
    /// descriptor limit instead.
    pub fn start_with_env(data_dir: &Path, args: &[String], env: &[(&str, &str)]) -> NodeProcess {
        let mut n = NodeProcess {
            child: None,
            data_dir: data_dir.to_path_buf(),
            socket: data_dir.join("shadowcache.sock"),
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: data_dir.join("node.log"),
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("node log");
        let nofile = self
            .env
            .iter()
            .find(|(k, _)| k == NOFILE_LIMIT)
            .map(|(_, v)| v.clone());
        let netns = self
            .env
            .iter()
            .find(|(k, _)| k == NETNS)
            .map(|(_, v)| v.clone());
        let mut cmd = match (&nofile, &netns) {
            (Some(_), Some(_)) => panic!("{NOFILE_LIMIT} and {NETNS} cannot be combined"),
            (None, Some(ns)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(binary("shadowcache-node"));
                c
            }
            (Some(n), None) => {
                assert!(
                    Command::new("prlimit")
                        .arg("--version")
                        .output()
                        .is_ok_and(|o| o.status.success()),
                    "this test runs the node under `prlimit`, which is not installed: apt-get install util-linux"
                );
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(binary("shadowcache-node"));
                c
            }
            (None, None) => Command::new(binary("shadowcache-node")),
        };
        cmd.arg("--data-dir").arg(&self.data_dir);
        if !self.args.iter().any(|a| a.starts_with("--node-id")) {
            cmd.arg("--node-id").arg("test-node");
        }
        let child = cmd
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(
                self.env
                    .iter()
                    .filter(|(k, _)| k != NOFILE_LIMIT && k != NETNS)
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn shadowcache-node");
        self.child = Some(child);
        let socket = self.socket.clone();
        let started = wait_for("the node's socket", Duration::from_secs(30), || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Some(Err(status));
            }
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| Ok(()))
        });
        if let Err(status) = started {
            panic!(
                "shadowcache-node exited with {status} at start; log:\n{}",
                self.log_text()
            );
        }
    }

    /// The running process's id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit (success), panicking otherwise.
    pub fn stop(&mut self) {
        self.stop_with("TERM");
    }

    /// Sends `signal` (a name such as TERM or INT) and waits for a clean exit.
    pub fn stop_with(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status();
        let status = wait_for(
            "the node to exit after SIGTERM",
            Duration::from_secs(30),
            || child.try_wait().ok().flatten(),
        );
        assert!(
            status.success(),
            "node exited with {status}; log:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL, no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the node again on the same data directory and arguments, after it was killed
    /// or exited (a process still running is killed first).
    pub fn start_again(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Stops cleanly and starts again on the same data directory and arguments.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy for fault injection: forwards every connection to `target` until it is cut;
/// while cut, bytes in both directions are swallowed (the connections stay open, as across a
/// failed link, so nothing on either side gets a quick error). Threads end when it drops.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: std::net::SocketAddr) -> Proxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = std::net::TcpStream::connect(target) else {
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        for (from, to) in [
                            (client.try_clone(), server.try_clone()),
                            (server.try_clone(), client.try_clone()),
                        ] {
                            if let (Ok(from), Ok(to)) = (from, to) {
                                let (c, s) = (c.clone(), s.clone());
                                std::thread::spawn(move || pump(from, to, &c, &s));
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { addr, cut, stop }
    }

    /// Cuts (true) or heals (false) the link.
    pub fn set_cut(&self, on: bool) {
        self.cut.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    cut: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::Read;
    use std::sync::atomic::Ordering;
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !cut.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// PEM files for a cluster's mutual TLS, made with rcgen: a CA and, per member, a certificate
/// for the cluster's server name signed by it.
#[derive(Debug)]
pub struct TestPki {
    /// The CA certificate file.
    pub ca: PathBuf,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    dir: PathBuf,
}

impl TestPki {
    /// A fresh CA under `dir`.
    pub fn new(dir: &Path) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "shadowcache test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        std::fs::create_dir_all(dir).expect("pki dir");
        let ca = dir.join("ca.pem");
        write_file(&ca, ca_cert.pem().as_bytes());
        TestPki {
            ca,
            ca_params,
            ca_key,
            dir: dir.to_path_buf(),
        }
    }

    /// A `[cluster.tls]` section of a node config for member `name` (a new certificate and key
    /// for the default server name), ending in a newline.
    pub fn cluster_tls_section(&self, name: &str) -> String {
        let (cert, key) = self.member(name, "shadowcache");
        format!(
            "[cluster.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            self.ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        )
    }

    /// A certificate and key for member `name`, valid for `server_name`, naming no role (as
    /// issued before roles: it may do everything): (cert, key) files.
    pub fn member(&self, name: &str, server_name: &str) -> (PathBuf, PathBuf) {
        self.issue(name, server_name, None)
    }

    /// A certificate and key for `name` in `role` (`member`, `client`, `admin`), valid for
    /// `server_name`: (cert, key) files.
    pub fn member_with_role(
        &self,
        name: &str,
        server_name: &str,
        role: &str,
    ) -> (PathBuf, PathBuf) {
        self.issue(name, server_name, Some(role))
    }

    /// A member's certificate and key for node `name` only (its calls in another node's name
    /// are refused), valid for `server_name`: (cert, key) files.
    pub fn member_for_node(&self, name: &str, server_name: &str) -> (PathBuf, PathBuf) {
        self.issue_with(name, server_name, Some("member"), true)
    }

    fn issue(&self, name: &str, server_name: &str, role: Option<&str>) -> (PathBuf, PathBuf) {
        self.issue_with(name, server_name, role, false)
    }

    fn issue_with(
        &self,
        name: &str,
        server_name: &str,
        role: Option<&str>,
        bound: bool,
    ) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("member key");
        let mut params =
            rcgen::CertificateParams::new(vec![server_name.to_string()]).expect("params");
        if let Some(role) = role {
            params.subject_alt_names.push(rcgen::SanType::URI(
                format!("urn:shadowcache:role:{role}")
                    .try_into()
                    .expect("role uri"),
            ));
        }
        if bound {
            params.subject_alt_names.push(rcgen::SanType::URI(
                format!("urn:shadowcache:node:{name}")
                    .try_into()
                    .expect("node uri"),
            ));
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        write_file(&c, cert.pem().as_bytes());
        write_file(&k, key.serialize_pem().as_bytes());
        (c, k)
    }
}
