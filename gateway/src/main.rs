//! `tidepool`: parse the command line, set up tracing, load config, hand off to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidepool::config::Config;

/// Tidepool: an edge event gateway. Sensors in (MQTT), rules at the edge, a durable buffer,
/// batches upstream over MQTT/TLS whenever the network is there.
#[derive(Parser, Debug)]
#[command(name = "tidepool", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the gateway (with no --config: the built-in defaults).
    Run {
        /// Config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the config; exit 1 with file, key and fix on error.
    Check {
        /// Config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the built-in defaults (a complete, commented config file) and exit.
        #[arg(long)]
        print_defaults: bool,
    },
    /// Backlog, oldest buffered age, upstream state, drops, DLQ size.
    Status {
        /// Config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the JSON document instead.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: inputs a rule failed on. Inspect, re-run through the rules, or discard.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// A live stream of what goes into the rules and what comes out (through the running
    /// daemon's admin endpoint): each input, each rule's verdict and the time it took, the
    /// outputs with their ids, the publishes.
    Tap {
        /// Config file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only inputs this rule ran on.
        #[arg(long)]
        rule: Option<String>,
        /// Only inputs whose topic matches this MQTT filter.
        #[arg(long)]
        topic: Option<String>,
        /// Only inputs whose source starts with this (`mqtt`, `serial:NAME`).
        #[arg(long)]
        source: Option<String>,
        /// Only inputs a rule failed on.
        #[arg(long)]
        errors_only: bool,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON object per line instead.
        #[arg(long)]
        json: bool,
    },
    /// Rule tools.
    Rules {
        #[command(subcommand)]
        cmd: RulesCmd,
    },
    /// One command, no config: a local cloud broker, the gateway and the simulator, with an
    /// outage and recovery, every event accounted for.
    Demo {
        /// Events the simulator sends.
        #[arg(long, default_value_t = 15_000)]
        events: u64,
        /// Events per second.
        #[arg(long, default_value_t = 1_500.0)]
        rate: f64,
        /// Seconds after the start when the cloud link goes down.
        #[arg(long, default_value_t = 3)]
        cut_at: u64,
        /// Seconds the link stays down.
        #[arg(long, default_value_t = 5)]
        cut_for: u64,
    },
}

#[derive(clap::Args, Debug)]
struct DlqArgs {
    /// Config file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Only these dead letters (repeatable); default: all.
    #[arg(long = "id")]
    ids: Vec<u64>,
    /// At most this many, oldest first; default: all (in pages, never all in memory at once).
    #[arg(long)]
    limit: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum DlqCmd {
    /// Show dead letters: rule, error, time, the input event.
    List {
        #[command(flatten)]
        args: DlqArgs,
        /// One JSON array instead of lines for people.
        #[arg(long)]
        json: bool,
        /// Only dead letters with ids above this one (where a previous page ended).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Run them through the whole current rule chain again (fixed a rule? retry).
    Retry {
        #[command(flatten)]
        args: DlqArgs,
    },
    /// Delete them.
    Drop {
        #[command(flatten)]
        args: DlqArgs,
    },
}

#[derive(Subcommand, Debug)]
enum RulesCmd {
    /// Dry-run rules (a file or a rules folder) on sample events, with in-memory state; print
    /// what went in and what came out. With --expect, exit 1 and show a diff on mismatch.
    Test {
        /// A `.rhai` file or a folder of them.
        path: PathBuf,
        /// Events, one JSON object a line: {"topic": ..., "payload": ..., "source"?, "ts"?}.
        #[arg(long)]
        events: PathBuf,
        /// Expected output, one JSON object a line (see README, "Writing rules").
        #[arg(long)]
        expect: Option<PathBuf>,
    },
}

fn tracing_init(default: &str) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(log_filter(default))
        .init();
}

/// The log filter: `TIDEPOOL_LOG`, else `RUST_LOG`, else `default` (unset or empty variables
/// are skipped; one that does not parse is said on stderr and skipped).
fn log_filter(default: &str) -> tracing_subscriber::filter::Targets {
    for var in ["TIDEPOOL_LOG", "RUST_LOG"] {
        let Ok(value) = std::env::var(var) else {
            continue;
        };
        match parse_log_filter(&value) {
            Ok(Some(filter)) => return filter,
            Ok(None) => {}
            Err(e) => eprintln!(
                "warning: {var}={value:?} ignored: {e}; expected LEVEL or TARGET=LEVEL, \
                 comma-separated (e.g. debug,rumqttc=warn)"
            ),
        }
    }
    parse_log_filter(default)
        .ok()
        .flatten()
        .expect("built-in log filter")
}

/// `LEVEL` and `TARGET=LEVEL` directives, comma-separated, blanks around them ignored; `None`
/// when there are none. Span and field filters (`target[span{field}]=level`) are refused: they
/// would bring in a regex engine for a feature the gateway's logs do not need.
fn parse_log_filter(s: &str) -> Result<Option<tracing_subscriber::filter::Targets>, String> {
    let directives: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Ok(None);
    }
    if let Some(d) = directives.iter().find(|d| d.contains(['[', '{'])) {
        return Err(format!("`{d}`: span and field filters are not supported"));
    }
    directives
        .join(",")
        .parse()
        .map(Some)
        .map_err(|e: tracing_subscriber::filter::ParseError| e.to_string())
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    let cfg = Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    })?;
    // `run` logs these itself (at WARN); the other commands say them once here.
    if !tracing::dispatcher::has_been_set() {
        for w in &cfg.warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.cmd {
        Cmd::Check {
            config,
            print_defaults,
        } => tidepool::check::main(config.as_deref(), print_defaults),
        Cmd::Run { config } => {
            tracing_init("info,rumqttc=warn");
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            rt.block_on(async {
                let (trigger, shutdown) = tidepool::shutdown::channel();
                tokio::spawn(async move {
                    wait_signal().await;
                    trigger.fire();
                });
                match tidepool::run(cfg, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Cmd::Tap {
            config,
            rule,
            topic,
            source,
            errors_only,
            limit,
            json,
        } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let filter = tidepool::tap::Filter {
                rule,
                topic,
                source,
                errors_only,
                limit,
            };
            rt.block_on(async {
                match tidepool::tap::run(&cfg, &filter, json).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Cmd::Status { config, json } => {
            let cfg = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            rt.block_on(async {
                match tidepool::status::fetch(&cfg).await {
                    Ok(v) => {
                        if json {
                            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                        } else {
                            print!("{}", tidepool::status::render(&v));
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Cmd::Dlq { cmd } => {
            let args = match &cmd {
                DlqCmd::List { args, .. } | DlqCmd::Retry { args } | DlqCmd::Drop { args } => args,
            };
            let cfg = match load(args.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let cmd = match cmd {
                DlqCmd::List { args, json, after } => tidepool::dlq::Command::List {
                    ids: args.ids,
                    limit: args.limit,
                    after,
                    json,
                },
                DlqCmd::Retry { args } => tidepool::dlq::Command::Retry {
                    ids: args.ids,
                    limit: args.limit,
                },
                DlqCmd::Drop { args } => tidepool::dlq::Command::Drop {
                    ids: args.ids,
                    limit: args.limit,
                },
            };
            let r = rt.block_on(tidepool::dlq::run(&cfg, cmd));
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Rules {
            cmd:
                RulesCmd::Test {
                    path,
                    events,
                    expect,
                },
        } => {
            let limits = tidepool_rules::Limits::default();
            let run = match tidepool::rules::dry_run::run(&path, &events, limits) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(1);
                }
            };
            print!("{}", run.report);
            match expect {
                None => ExitCode::SUCCESS,
                Some(exp) => match tidepool::rules::dry_run::compare(&run.actual, &exp) {
                    Ok(None) => {
                        println!("matches {}", exp.display());
                        ExitCode::SUCCESS
                    }
                    Ok(Some(diff)) => {
                        eprint!("{diff}");
                        ExitCode::from(1)
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::from(1)
                    }
                },
            }
        }
        Cmd::Demo {
            events,
            rate,
            cut_at,
            cut_for,
        } => {
            tracing_init("warn,rumqttc=off");
            let plan = tidepool::demo::DemoPlan {
                events,
                rate,
                cut_at: std::time::Duration::from_secs(cut_at),
                cut_for: std::time::Duration::from_secs(cut_for),
            };
            match rt.block_on(tidepool::demo::run(plan)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::parse_log_filter;
    use tracing::Level;

    #[test]
    fn log_filter_takes_levels_per_target_and_a_default() {
        let f = parse_log_filter(" debug , rumqttc=warn,").unwrap().unwrap();
        assert!(f.would_enable("tidepool::store", &Level::DEBUG));
        assert!(!f.would_enable("tidepool::store", &Level::TRACE));
        assert!(f.would_enable("rumqttc::state", &Level::WARN));
        assert!(!f.would_enable("rumqttc::state", &Level::INFO));
        let f = parse_log_filter("warn,rumqttc=off").unwrap().unwrap();
        assert!(!f.would_enable("rumqttc", &Level::ERROR));
        assert!(f.would_enable("tidepool", &Level::WARN));
    }

    #[test]
    fn log_filter_refuses_a_bad_level_and_skips_an_empty_one() {
        assert!(parse_log_filter("tidepool=loud").is_err());
        assert!(parse_log_filter("tidepool[run]=debug").is_err());
        assert!(parse_log_filter(" , ").unwrap().is_none());
    }
}
