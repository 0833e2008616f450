//! `tidepool status`: asks the running daemon, or reads the store when it is not running.

use std::fmt::Write;

use serde_json::{json, Value};

use crate::config::Config;
use crate::event::now_ms;
use crate::store;

/// The status document: from the daemon's admin endpoint if it answers, else from the store.
pub async fn fetch(cfg: &Config) -> anyhow::Result<Value> {
    if let Some(addr) = cfg.admin.addr() {
        let token = cfg.admin.client_token();
        if let Ok((200, body)) = crate::admin::get(addr, token.as_deref(), "/status").await {
            if let Ok(v) = serde_json::from_str::<Value>(&body) {
                return Ok(v);
            }
        }
    }
    offline(cfg)
}

/// Reads the store directly (the daemon is not running).
pub fn offline(cfg: &Config) -> anyhow::Result<Value> {
    let path = cfg.store_path();
    if !path.exists() {
        anyhow::bail!(
            "the daemon is not answering on {} and there is no store at {} (is data_dir right?)",
            if cfg.admin.listen.is_empty() {
                "(admin disabled)"
            } else {
                &cfg.admin.listen
            },
            path.display()
        );
    }
    // Read-only first; after a crash the file needs a repair, which only a writer can do
    // (the daemon does it at start; so can we while it is not running).
    let st = match redb::ReadOnlyDatabase::open(&path) {
        Ok(db) => store::stats(&db)?,
        Err(first) => {
            let db = redb::Database::builder().create(&path).map_err(|e| {
                anyhow::anyhow!(
                    "cannot open {} ({first}; {e}); if the daemon runs, enable [admin] listen so status can ask it",
                    path.display()
                )
            })?;
            store::stats(&db)?
        }
    };
    let dropped: serde_json::Map<String, Value> = st
        .dropped
        .iter()
        .map(|(k, v)| (k.clone(), (*v).into()))
        .collect();
    Ok(json!({
        "gateway": cfg.gateway.id,
        "running": false,
        "backlog_events": st.backlog_events,
        "backlog_bytes": st.backlog_bytes,
        "oldest_age_seconds": st.oldest_ts.map(|t| ((now_ms() - t).max(0) as f64) / 1000.0).unwrap_or(0.0),
        "next_id": st.next_id,
        "dropped": dropped,
        "upstream": { "state": "stopped", "connected": false, "last_error": "" },
        "dlq_events": st.dlq_events,
        "dlq_bytes": st.dlq_bytes,
        "rules": [],
    }))
}

fn bytes(n: u64) -> String {
    let s = crate::config::ByteSize(n).to_string();
    let at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    format!("{} {}", &s[..at], &s[at..])
}

/// Renders the document for a person.
pub fn render(v: &Value) -> String {
    let mut o = String::new();
    let running = v["running"].as_bool().unwrap_or(false);
    let _ = writeln!(
        o,
        "gateway   {}  ({})",
        v["gateway"].as_str().unwrap_or("?"),
        if running {
            format!("running, up {}s", v["uptime_seconds"].as_i64().unwrap_or(0))
        } else {
            "not running: read from the store".into()
        }
    );
    let _ = writeln!(
        o,
        "backlog   {} events, {}, oldest {:.1}s",
        v["backlog_events"],
        bytes(v["backlog_bytes"].as_u64().unwrap_or(0)),
        v["oldest_age_seconds"].as_f64().unwrap_or(0.0)
    );
    let up = &v["upstream"];
    let err = up["last_error"].as_str().unwrap_or("");
    let _ = writeln!(
        o,
        "upstream  {}{}",
        up["state"].as_str().unwrap_or("?"),
        if err.is_empty() {
            String::new()
        } else {
            format!(" — {err}")
        }
    );
    if running {
        let _ = writeln!(
            o,
            "events    ingested {}  committed {}  forwarded {}",
            v["ingested"], v["committed"], v["forwarded"]
        );
    }
    if let Some(d) = v["dropped"].as_object() {
        let parts: Vec<String> = d.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(o, "dropped   {}", parts.join("  "));
    }
    let _ = writeln!(
        o,
        "dlq       {} events, {}",
        v["dlq_events"],
        bytes(v["dlq_bytes"].as_u64().unwrap_or(0))
    );
    if let Some(rules) = v["rules"].as_array() {
        if rules.is_empty() {
            let _ = writeln!(o, "rules     none (events pass through)");
        }
        for r in rules {
            let _ = writeln!(
                o,
                "rule      {:<24} in {}  dropped {}  errors {}{}",
                r["name"].as_str().unwrap_or("?"),
                r["events_in"].as_u64().unwrap_or(0),
                r["dropped"].as_u64().unwrap_or(0),
                r["errors"].as_u64().unwrap_or(0),
                match r["refused_update"].as_str() {
                    Some(e) => format!("\n          new version refused: {e}"),
                    None => String::new(),
                }
            );
            if let Some(e) = r["last_error"].as_str().filter(|e| !e.is_empty()) {
                let _ = writeln!(o, "          last error: {e}");
            }
        }
    }
    o
}
