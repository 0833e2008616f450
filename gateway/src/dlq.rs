//! `tidepool dlq list|retry|drop`: through the running daemon's admin endpoint, or directly on
//! the store when the daemon is not running.

use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::admin::metrics::Metrics;
use crate::config::Config;
use crate::store::{self, CommitLoop};

fn query(ids: &[u64]) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        format!(
            "?ids={}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

/// The dead letters (all, or `ids`).
pub async fn list(cfg: &Config, ids: &[u64]) -> anyhow::Result<Vec<Value>> {
    if let Some(addr) = cfg.admin.addr() {
        let token = cfg.admin.client_token();
        let path = format!("/dlq{}", query(ids));
        if let Ok((200, body)) = crate::admin::get(addr, token.as_deref(), &path).await {
            return serde_json::from_str(&body).context("admin endpoint answered with bad JSON");
        }
    }
    let db = open_offline(cfg)?;
    let sel = (!ids.is_empty()).then_some(ids);
    Ok(store::dlq_list(&*db, sel)?
        .iter()
        .map(|(id, d)| crate::admin::dead_letter_json(*id, d))
        .collect())
}

/// Retries (`retry = true`) or drops dead letters; returns a summary line.
pub async fn act(cfg: &Config, retry: bool, ids: &[u64]) -> anyhow::Result<String> {
    let path = format!(
        "/dlq/{}{}",
        if retry { "retry" } else { "drop" },
        query(ids)
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
    let (_in_tx, in_rx) = mpsc::channel(1);
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
    let sel = (!ids.is_empty()).then_some(ids);
    Ok(if retry {
        let (n, again) = lp.retry_dead_letters(sel)?;
        format!("retried {n} dead letters; {again} failed again")
    } else {
        format!("dropped {} dead letters", lp.drop_dead_letters(sel)?)
    })
}

fn open_offline(cfg: &Config) -> anyhow::Result<Arc<redb::Database>> {
    let path = cfg.store_path();
    if !path.exists() {
        anyhow::bail!("no store at {} (is data_dir right?)", path.display());
    }
    store::open(&path, cfg.buffer.cache_size.0).map_err(|e| {
        anyhow::anyhow!("{e}; if the daemon runs, enable [admin] listen so this command can ask it")
    })
}
