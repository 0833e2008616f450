//! `tidepool dlq list|retry|drop`: through the running daemon's admin endpoint, or directly on
//! the store when the daemon is not running. Everything works in pages, so neither side ever
//! holds the whole queue in memory: `list` prints each page as it arrives, `retry` and `drop`
//! take one transaction per page (see `store::dlq`).

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::admin::metrics::Metrics;
use crate::config::Config;
use crate::store::commit::DlqRequest;
use crate::store::{self, CommitLoop};

/// Rows fetched per page by `list`.
const LIST_PAGE: u64 = 100;

/// One `tidepool dlq` command.
#[derive(Debug, Clone)]
pub enum Command {
    /// Show dead letters, oldest first.
    List {
        /// Only these ids; empty: all.
        ids: Vec<u64>,
        /// At most this many.
        limit: Option<u64>,
        /// Only ids above this one (the last id of a previous listing).
        after: u64,
        /// One JSON array instead of lines for people.
        json: bool,
    },
    /// Re-run them through the whole rule chain.
    Retry {
        /// Only these ids; empty: all.
        ids: Vec<u64>,
        /// At most this many (oldest first).
        limit: Option<u64>,
    },
    /// Delete them.
    Drop {
        /// Only these ids; empty: all.
        ids: Vec<u64>,
        /// At most this many (oldest first).
        limit: Option<u64>,
    },
}

/// Runs one command, printing to stdout.
pub async fn run(cfg: &Config, cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List {
            ids,
            limit,
            after,
            json,
        } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            list(cfg, &ids, limit, after, json, &mut out).await?;
            out.flush()?;
        }
        Command::Retry { ids, limit } => println!("{}", act(cfg, true, &ids, limit).await?),
        Command::Drop { ids, limit } => println!("{}", act(cfg, false, &ids, limit).await?),
    }
    Ok(())
}

fn query(ids: &[u64], after: u64, limit: Option<u64>) -> String {
    let mut q = Vec::new();
    if !ids.is_empty() {
        q.push(format!(
            "ids={}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if after > 0 {
        q.push(format!("after={after}"));
    }
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// Where the pages come from.
enum Source {
    Daemon(std::net::SocketAddr, Option<String>),
    Store(store::Store),
}

impl Source {
    async fn open(cfg: &Config) -> anyhow::Result<Source> {
        if let Some(addr) = cfg.admin.addr() {
            let token = cfg.admin.client_token();
            match crate::admin::get(addr, token.as_deref(), "/dlq?limit=1").await {
                Ok((200, _)) => return Ok(Source::Daemon(addr, token)),
                // The daemon runs but refuses us: say why rather than try the locked store.
                Ok((code @ (401 | 403), body)) => {
                    anyhow::bail!("the daemon answered {code}: {}", body.trim())
                }
                _ => {}
            }
        }
        Ok(Source::Store(open_offline(cfg)?))
    }

    async fn page(&self, ids: &[u64], after: u64, limit: u64) -> anyhow::Result<Vec<Value>> {
        match self {
            Source::Daemon(addr, token) => {
                let path = format!("/dlq{}", query(ids, after, Some(limit)));
                let (code, body) = crate::admin::get(*addr, token.as_deref(), &path).await?;
                if code != 200 {
                    anyhow::bail!("the daemon answered {code}: {}", body.trim());
                }
                serde_json::from_str(&body).context("admin endpoint answered with bad JSON")
            }
            Source::Store(db) => {
                let sel = store::dlq::Select {
                    ids: (!ids.is_empty()).then(|| ids.to_vec()),
                    below: None,
                };
                let page = store::dlq::page(&*db.db()?, &sel, after, limit as usize)?;
                Ok(page
                    .rows
                    .iter()
                    .map(|(id, d)| crate::admin::dlq_row_json(*id, d))
                    .collect())
            }
        }
    }
}

/// Prints dead letters page by page (at most `limit`, ids above `after`); returns how many.
pub async fn list(
    cfg: &Config,
    ids: &[u64],
    limit: Option<u64>,
    after: u64,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let source = Source::open(cfg).await?;
    let mut left = limit.unwrap_or(u64::MAX);
    let mut cursor = after;
    let mut shown = 0u64;
    let mut more = false;
    if json {
        write!(out, "[")?;
    }
    while left > 0 {
        let rows = source.page(ids, cursor, LIST_PAGE.min(left)).await?;
        let Some(last) = rows.last().and_then(|r| r["id"].as_u64()) else {
            break;
        };
        for r in &rows {
            if json {
                let sep = if shown == 0 { "\n" } else { ",\n" };
                write!(out, "{sep}{}", serde_json::to_string_pretty(r)?)?;
            } else {
                print_row(out, r)?;
            }
            shown += 1;
        }
        left = left.saturating_sub(rows.len() as u64);
        cursor = last;
        if left == 0 {
            more = !source.page(ids, cursor, 1).await?.is_empty();
        }
    }
    if json {
        writeln!(out, "{}]", if shown == 0 { "" } else { "\n" })?;
    } else if shown == 0 {
        writeln!(out, "no dead letters")?;
    } else if more {
        writeln!(out, "(more: tidepool dlq list --after {cursor})")?;
    }
    Ok(shown)
}

/// One dead letter, for people.
fn print_row(out: &mut impl Write, r: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "#{}  rule {}: {}\n     {} {}{}",
        r["id"],
        r["rule"].as_str().unwrap_or(""),
        r["error"].as_str().unwrap_or(""),
        r["event"]["topic"].as_str().unwrap_or(""),
        r["event"]["payload"],
        r["trace"]
            .as_str()
            .map(|t| format!("  trace {t}"))
            .unwrap_or_default()
    )
}

/// Retries (`retry = true`) or drops dead letters; returns a summary line.
pub async fn act(
    cfg: &Config,
    retry: bool,
    ids: &[u64],
    limit: Option<u64>,
) -> anyhow::Result<String> {
    let path = format!(
        "/dlq/{}{}",
        if retry { "retry" } else { "drop" },
        query(ids, 0, limit)
    );
    if let Some(addr) = cfg.admin.addr() {
        let token = cfg.admin.client_token();
        if let Ok((code, body)) = crate::admin::request(addr, token.as_deref(), "POST", &path).await
        {
            if code == 200 {
                return Ok(body.trim().to_string());
            }
            anyhow::bail!("the daemon answered {code}: {}", body.trim());
        }
    }
    let db = open_offline(cfg)?;
    let metrics = Arc::new(Metrics::default());
    let rules = crate::rules::RhaiStage::new(&cfg.rules, &cfg.gateway.id, metrics.clone());
    let (_in_tx, in_rx) = crate::ingest::channel::channel(1, 1 << 20);
    let (_ack_tx, ack_rx) = mpsc::unbounded_channel();
    let (committed, _) = watch::channel(0);
    let mut lp = CommitLoop::new(
        db,
        cfg.buffer.clone(),
        metrics,
        Box::new(rules),
        in_rx,
        ack_rx,
        committed,
        tokio::runtime::Handle::current(),
    )?;
    let req = DlqRequest {
        ids: (!ids.is_empty()).then(|| ids.to_vec()),
        limit,
        page: None,
    };
    Ok(if retry {
        let (n, again) = lp.retry_dead_letters(&req)?;
        format!("retried {n} dead letters; {again} failed again")
    } else {
        format!("dropped {} dead letters", lp.drop_dead_letters(&req)?)
    })
}

fn open_offline(cfg: &Config) -> anyhow::Result<store::Store> {
    let path = cfg.store_path();
    if !path.exists() {
        anyhow::bail!("no store at {} (is data_dir right?)", path.display());
    }
    store::open(&path, cfg.buffer.cache_size.0).map_err(|e| {
        anyhow::anyhow!("{e}; if the daemon runs, enable [admin] listen so this command can ask it")
    })
}
