//! The `shadowcache-node` daemon's entry point: flags, runtime and signals; no node logic.
//! `node/src/main.rs` calls it, and so does `shadowcache-bench node` (so that the bench can
//! launch nodes when only its own binary was built, as `cargo run -p shadowcache-bench` does).

use std::process::ExitCode;

use crate::{Config, Flags, telemetry};
use clap::Parser;

/// Says `msg` on stderr; a stderr that cannot be written (a log file on a full disk) is not a
/// reason to panic.
fn say(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "shadowcache-node: {msg}");
}

/// The daemon: parses `args` (the program name first) as `shadowcache-node`'s flags, runs
/// the node until SIGTERM or SIGINT, and says how it ended.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let flags = Flags::parse_from(args);
    let config = match Config::from_flags(&flags) {
        Ok(c) => c,
        Err(e) => {
            say(format_args!("{e}"));
            return ExitCode::from(2);
        }
    };
    if flags.check_config {
        return check_config(&config);
    }
    let log_filter = telemetry::init_tracing(config.log_format, config.log_filter.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shadowcache")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say(format_args!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, &flags, log_filter)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            say(format_args!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// `--check-config`: the files the configuration names, checked as the node would use them;
/// what it amounts to on stdout, each problem on stderr. Exit 0 if it would start, 2 if not.
fn check_config(config: &Config) -> ExitCode {
    let mut problems: Vec<String> = Vec::new();
    let readable = |what: &str, path: &std::path::Path, problems: &mut Vec<String>| {
        if let Err(e) = std::fs::File::open(path) {
            problems.push(format!("{what} {}: {e}", path.display()));
        }
    };
    for d in &config.disks {
        let shown = d.origin.to_string_lossy();
        if crate::origin::nbd::is_nbd_uri(&shown) {
            // Another NBD server, reached when the node starts: nothing to open here.
            continue;
        }
        // As the node opens it: a mutable disk for writing too.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(d.mode == crate::DiskMode::Mutable)
            .open(&d.origin);
        if let Err(e) = opened {
            problems.push(format!(
                "disk {:?}: origin {}: {e}",
                d.id,
                d.origin.display()
            ));
        }
    }
    let mut certificates = Vec::new();
    if let Some(t) = &config.cluster.tls {
        readable("[cluster.tls] ca", &t.ca, &mut problems);
        readable("[cluster.tls] key", &t.key, &mut problems);
        match crate::certs::read("cluster", &t.cert) {
            Ok(c) => certificates.push(c),
            Err(e) => problems.push(format!("[cluster.tls] cert {e}")),
        }
        if let Err(e) = crate::server::certificate_speaks_for_this_node(config) {
            problems.push(e.to_string());
        }
    }
    if let Some(t) = &config.nbd_tls {
        readable("[nbd_tls] key", &t.key, &mut problems);
        match crate::certs::read("nbd", &t.cert) {
            Ok(c) => certificates.push(c),
            Err(e) => problems.push(format!("[nbd_tls] cert {e}")),
        }
    }
    if let Some(p) = &config.cluster.secret_file
        && let Err(e) = crate::cluster::gossip_auth::ClusterKey::from_file(p)
    {
        problems.push(format!("cluster.secret_file: {e}"));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for c in &certificates {
        if c.not_after_unix <= now {
            problems.push(format!(
                "{} certificate {} has expired",
                c.role,
                c.path.display()
            ));
        }
    }
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    println!("node id      {}", config.node_id);
    println!("data dir     {}", config.data_dir.display());
    println!("grpc         unix {}", config.listen_unix.display());
    if let Some(a) = config.listen_tcp {
        println!("             tcp {a}");
    }
    match (&config.nbd_unix, config.nbd_listen) {
        (None, None) => println!("nbd          off"),
        (u, t) => println!(
            "nbd          {}{}",
            u.as_ref()
                .map_or(String::new(), |u| format!("unix {} ", u.display())),
            t.map_or(String::new(), |t| format!("tcp {t}"))
        ),
    }
    println!(
        "cache        block {} KiB, RAM {:.0} MiB, SSD {:.0} MiB at {}",
        config.block_bytes / 1024,
        mib(config.ram_bytes),
        mib(config.ssd_bytes),
        config.ssd_path.display()
    );
    match config.cluster.peer_listen {
        Some(p) => println!(
            "cluster      peer {p}, {} seed(s), {}",
            config.cluster.seeds.len(),
            match (&config.cluster.secret_file, &config.cluster.tls) {
                (Some(_), Some(_)) => "cluster key and mutual TLS",
                (Some(_), None) => "cluster key",
                (None, Some(_)) => "mutual TLS",
                (None, None) => "OPEN (neither cluster.secret_file nor [cluster.tls])",
            }
        ),
        None => println!("cluster      none (a node alone)"),
    }
    for d in &config.disks {
        println!(
            "disk         {} = {} ({})",
            d.id,
            d.origin.display(),
            d.mode.as_str()
        );
    }
    for c in &certificates {
        println!(
            "certificate  {} {} {}, expires in {} days",
            c.role,
            c.path.display(),
            c.subject,
            (c.not_after_unix - now) / 86_400
        );
    }
    if problems.is_empty() {
        println!("configuration OK");
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            say(format_args!("{p}"));
        }
        say(format_args!(
            "configuration has {} problem(s); the node would not start",
            problems.len()
        ));
        ExitCode::from(2)
    }
}

/// SIGHUP: the config file is read again and what can change while running is applied: the
/// log filter (`log_filter`). Everything else (listeners, cache sizes, disks, the cluster,
/// certificates) is bound at start; a change there takes a restart, and the log says so.
fn reload(flags: &Flags, running: &Config, log_filter: Option<&telemetry::LogFilter>) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
    match Config::from_flags(flags) {
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: the configuration has an error; nothing reloaded");
        }
        Ok(new) => {
            match log_filter.map(|l| l.set(new.log_filter.as_deref())) {
                Some(Ok(true)) => {
                    tracing::info!(
                        log_filter = new.log_filter.as_deref().unwrap_or("info"),
                        "SIGHUP: log filter reloaded"
                    );
                }
                Some(Ok(false)) => {
                    tracing::info!(
                        "SIGHUP: RUST_LOG sets the log filter; log_filter is not applied"
                    );
                }
                Some(Err(e)) => tracing::error!(error = %e, "SIGHUP: log filter not reloaded"),
                None => {}
            }
            let mut unchanged = new.clone();
            unchanged.log_filter.clone_from(&running.log_filter);
            if format!("{unchanged:?}") != format!("{running:?}") {
                tracing::warn!(
                    "SIGHUP: other keys of the configuration changed; they take effect at the next restart"
                );
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

async fn run(
    config: Config,
    flags: &Flags,
    log_filter: Option<telemetry::LogFilter>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Fail points from FAILPOINTS, in a build for fault tests only; said loudly.
    #[cfg(feature = "failpoints")]
    let _faults = {
        let f = fail::FailScenario::setup();
        tracing::warn!(failpoints = ?fail::list(), "built with fail points: a test build, not for production");
        f
    };
    if let Some(addr) = config.metrics {
        telemetry::install_prometheus(addr).map_err(anyhow::Error::msg)?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let running = crate::start(config.clone()).await?;
    // Ready for systemd (Type=notify): the sockets are bound and the cluster joined. Without
    // NOTIFY_SOCKET (not under systemd) this does nothing.
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!(
                "serving {} disk(s) as {}",
                running.node().registry().list().len(),
                config.node_id
            )),
        ],
    );
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => reload(flags, &config, log_filter.as_ref()),
        }
    };
    tracing::info!(signal = which, "shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    running.shutdown().await
}
