//! `shadowcache-node`: parse flags, load the config, start the node, wait for SIGTERM or SIGINT,
//! shut down leaving the cache warm.
//!
//! Architecture invariant: thin: flags, runtime and signals; no node logic.

use std::process::ExitCode;

use clap::Parser;
use shadowcache_node::{Config, Flags, telemetry};

/// Says `msg` on stderr; a stderr that cannot be written (a log file on a full disk) is not a
/// reason to panic.
fn say(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "shadowcache-node: {msg}");
}

fn main() -> ExitCode {
    let flags = Flags::parse();
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
    let running = shadowcache_node::start(config).await?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down");
    running.shutdown().await
}
