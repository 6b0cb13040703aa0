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
    telemetry::init_tracing(config.log_format);
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
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            say(format_args!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
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
    let running = crate::start(config).await?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down");
    running.shutdown().await
}
