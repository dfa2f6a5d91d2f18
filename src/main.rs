//! The `wsbridge` binary: the command-line edge. Everything here is argument parsing,
//! logging setup and exit codes; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::info;
use wsbridge::bridge::Bridge;
use wsbridge::config::Config;
use wsbridge::demo;
use wsbridge::telemetry::{self, LogFormat};

/// Bridges providers' real-time WebSocket APIs (VoicePact, VoIPBIN, Hashi built in, any other
/// by a dialect file) into one CloudEvents stream.
#[derive(Parser, Debug)]
#[command(name = "wsbridge", version, about)]
struct Cli {
    /// Log format: human or json.
    #[arg(long, global = true, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service.
    Serve {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// How often the config file is checked for changes ("0s": only on SIGHUP).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        watch_interval: Duration,
    },
    /// Start the provider simulators, the bridge and a printing consumer; show events flow.
    Demo {
        /// Print raw envelopes, one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Pause between scripted events (e.g. "150ms", "0s").
        #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// How many times the script is played.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
    },
    /// Validate a config file: prints every problem with its key, exits 1 if there is any.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Show which routes an event matches and why the others do not.
    Route {
        /// The event: a canonical envelope, or a raw provider frame (decoded first).
        #[arg(long, value_name = "EVENT.json")]
        explain: PathBuf,
        /// The config whose routes are checked.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Decode a raw frame with this upstream's adapter (default: guessed from its shape).
        #[arg(long)]
        upstream: Option<String>,
    },
    /// Write and test dialect files: list the known ones, check files, decode frames.
    Dialect {
        #[command(subcommand)]
        command: DialectCommand,
    },
    /// Follow a running bridge's events over /v1/ws: one line per event (or --json) until
    /// Ctrl-C; exits 1 if the bridge refuses the subscription or closes the connection.
    Tail(wsbridge::cli::tail::TailArgs),
    /// Operate a running bridge through its admin API: upstreams, webhooks, dead letters,
    /// replay, enable.
    Admin(wsbridge::cli::admin::AdminArgs),
    /// Run the three provider simulators on their default ports (what config.toml points at),
    /// replaying every documented event type in a loop.
    Simulate {
        /// Pause between scripted events.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
}

#[derive(Subcommand, Debug)]
enum DialectCommand {
    /// The built-in dialects and the files loaded from a config's `[dialects] paths` (or the
    /// PATHs given), with their descriptions and parameters.
    List {
        /// Also list the dialects this config loads.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Dialect files, or folders of `*.toml` dialect files.
        paths: Vec<PathBuf>,
    },
    /// Compile each file and run its `[[examples]]`; a failing example shows what differs.
    /// Exits 1 if any file fails.
    Check {
        /// Dialect files (or built-in dialect names).
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Decode frames (stdin, one per line) with a dialect: envelopes on stdout as JSON lines,
    /// control frames and decode errors on stderr. Exits 1 if any frame did not decode.
    Decode {
        /// A dialect file (or a built-in dialect name).
        file: String,
        /// A parameter of the dialect, `KEY=VALUE` (repeatable); a non-string parameter's
        /// value is JSON (`topics=["a"]`); `url=` sets the URL (default ws://example.invalid/).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet_default = matches!(
        cli.command,
        Command::Demo { .. }
            | Command::CheckConfig { .. }
            | Command::Dialect { .. }
            | Command::Tail(_)
            | Command::Admin(_)
    );
    telemetry::init(cli.log_format, if quiet_default { "warn" } else { "info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!("{}: ok ({} upstreams)", file.display(), c.upstreams.len());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Serve {
            config: path,
            watch_interval,
        } => {
            let config =
                Config::load(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            // Before anything opens a descriptor; the connection cap is derived from it.
            wsbridge::http::server::raise_open_files_limit();
            ignore_file_size_signal()?;
            // Installed before anything starts: a SIGTERM arriving while the upstreams
            // connect must stop the bridge gracefully (draining them), not kill it.
            let stop = shutdown_signal()?;
            tokio::pin!(stop);
            let mut hangup = hangup_signal()?;
            let bridge = Bridge::start(&config)
                .await
                .context("starting the bridge")?;
            // The event log (one debug line per event) reads the live ring like a consumer:
            // only when it is on. Subscribed always, it woke this thread for every event
            // published, at whatever log level (issue 15's ingest profile: ~8,000 wake-ups a
            // second at full speed).
            let mut events = tracing::enabled!(tracing::Level::DEBUG).then(|| bridge.subscribe());
            info!(
                upstreams = config.upstreams.len(),
                "wsbridge running; Ctrl-C or SIGTERM stops"
            );
            let mut watch = wsbridge::reload::FileWatch::new(&path);
            watch.watch_also(&config.dialects.paths);
            let mut poll = tokio::time::interval(if watch_interval.is_zero() {
                Duration::from_secs(3600)
            } else {
                watch_interval
            });
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = hangup.recv() => {
                        info!(config = %path.display(), "SIGHUP: reloading the config");
                        watch.changed();
                        if let Ok(report) = wsbridge::reload::reload_file(&bridge, &path).await {
                            watch.watch_also(&report.dialect_paths);
                        }
                    }
                    _ = poll.tick(), if !watch_interval.is_zero() => {
                        if watch.changed() {
                            info!(config = %path.display(), "config or dialect file changed: reloading");
                            if let Ok(report) = wsbridge::reload::reload_file(&bridge, &path).await {
                                watch.watch_also(&report.dialect_paths);
                            }
                        }
                    }
                    got = async {
                        match events.as_mut() {
                            Some(events) => events.recv().await,
                            None => std::future::pending().await,
                        }
                    } => match got {
                        Ok(p) => tracing::debug!(seq = p.envelope.seq.unwrap_or(0), r#type = %p.envelope.event_type,
                            subject = p.envelope.subject.as_deref().unwrap_or(""), source = %p.envelope.source, "event"),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => info!(skipped = n, "event log fell behind"),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
            info!("shutting down");
            if bridge.shutdown().await.journal_complete {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Demo {
            json,
            interval,
            rounds,
        } => {
            demo::run(demo::DemoOptions {
                json,
                interval,
                rounds,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Route {
            explain,
            config,
            upstream,
        } => {
            let config =
                Config::load(&config).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let input = std::fs::read_to_string(&explain)
                .with_context(|| format!("reading {}", explain.display()))?;
            let (envelope, how) =
                wsbridge::explain::to_envelope(&config, &input, upstream.as_deref())?;
            print!("{}", wsbridge::explain::report(&config, &envelope, &how));
            Ok(ExitCode::SUCCESS)
        }
        Command::Dialect { command } => dialect(command),
        Command::Tail(args) => {
            let stop = shutdown_signal()?;
            wsbridge::cli::tail::run(args, stop, &mut std::io::stdout().lock()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(args) => {
            wsbridge::cli::admin::run(
                args,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate { interval } => {
            demo::simulate(interval).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn dialect(command: DialectCommand) -> anyhow::Result<ExitCode> {
    use wsbridge::dialect_tool;
    match command {
        DialectCommand::List { config, paths } => {
            let mut all = paths;
            if let Some(path) = config {
                let c =
                    Config::load(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                all.extend(c.dialects.paths);
            }
            let registry = wsbridge::adapters::dialect::Registry::load(&all).map_err(|errors| {
                anyhow::anyhow!(
                    "{}",
                    errors
                        .iter()
                        .map(|e| e.message.clone())
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })?;
            print!("{}", dialect_tool::list(&registry));
            Ok(ExitCode::SUCCESS)
        }
        DialectCommand::Check { files } => {
            let mut ok = true;
            for file in &files {
                let result = dialect_tool::check(file);
                if result.ok {
                    print!("{}", result.report);
                } else {
                    ok = false;
                    eprint!("{}", result.report);
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        DialectCommand::Decode { file, params } => {
            let d = dialect_tool::resolve(&file)?;
            let p = dialect_tool::params(&d, &params)?;
            let adapter = wsbridge::adapters::build_adapter(d, &p)
                .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
            let summary = dialect_tool::decode(
                adapter.as_ref(),
                std::io::stdin().lock(),
                std::io::stdout().lock(),
                std::io::stderr().lock(),
            )
            .context("decoding stdin")?;
            Ok(if summary.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A write past the process's file-size limit (`RLIMIT_FSIZE`, e.g. systemd's
/// `LimitFSIZE=`) raises SIGXFSZ, whose default action kills the process, losing every event
/// read and not yet journalled. Handled, the write fails with `EFBIG` instead: the store
/// retries it with backoff and `/readyz` reports it, as for a full disk.
#[cfg(unix)]
fn ignore_file_size_signal() -> anyhow::Result<()> {
    // SIGXFSZ is 25 on Linux, the BSDs and macOS. Tokio keeps the handler for the life of
    // the process once registered; the stream itself is not needed.
    const SIGXFSZ: std::os::raw::c_int = 25;
    let stream = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(SIGXFSZ))
        .context("handling SIGXFSZ")?;
    drop(stream);
    Ok(())
}

#[cfg(not(unix))]
fn ignore_file_size_signal() -> anyhow::Result<()> {
    Ok(())
}

/// SIGHUP, the conventional "reload your config" signal.
#[cfg(unix)]
fn hangup_signal() -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")
}

/// Installs the SIGTERM and SIGINT (Ctrl-C) handlers at once, and returns a future that
/// resolves on either. Registering eagerly matters: until a handler is installed, the signal's
/// default action kills the process, without the graceful shutdown.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
