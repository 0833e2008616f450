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

fn decimal(n: f64) -> String {
    let units = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
    for (scale, unit) in units {
        if n.abs() >= scale {
            return format!("{:.1} {unit}", n / scale);
        }
    }
    format!("{n:.0} B")
}

/// The wear forecast and, while the backlog grows, when the buffer is full.
fn wear_lines(o: &mut String, v: &Value) {
    let w = &v["wear"];
    let window = v["commit_window_seconds"].as_f64().unwrap_or(0.0);
    if w["span_seconds"].as_f64().unwrap_or(0.0) <= 0.0 {
        let _ = writeln!(o, "wear      measuring (a forecast after the first minute)");
        return;
    }
    let per_day = w["bytes_per_day"].as_f64().unwrap_or(0.0);
    let budget = w["write_budget"].as_u64().unwrap_or(0);
    let per_event = match w["bytes_per_event"].as_f64() {
        Some(b) => format!("{} per event, ", decimal(b)),
        None => String::new(),
    };
    let verdict = if budget == 0 {
        "no write budget".to_string()
    } else if per_day <= budget as f64 * 1.05 {
        format!("within the {}/day budget", decimal(budget as f64))
    } else {
        format!(
            "over the {}/day budget by {:.0}%",
            decimal(budget as f64),
            (per_day / budget as f64 - 1.0) * 100.0
        )
    };
    let _ = writeln!(
        o,
        "wear      {}/day written at this rate ({per_event}{:.2} commits/s); {verdict}",
        decimal(per_day),
        w["commits_per_second"].as_f64().unwrap_or(0.0),
    );
    match w["card_life_years"].as_f64() {
        Some(y) => {
            let _ = writeln!(o, "          card life about {y:.1} years at this rate");
        }
        None if per_day > 0.0 => {
            let _ = writeln!(
                o,
                "          card life: set [buffer] card_endurance (the card's rated bytes written) for a forecast"
            );
        }
        None => {}
    }
    if v["budget_spent"].as_bool().unwrap_or(false) {
        let _ = writeln!(
            o,
            "          commits wait {window:.1} s for more events (the write budget is spent)"
        );
    }
    let growth = w["backlog_bytes_per_second"].as_f64().unwrap_or(0.0);
    if growth > 0.0 {
        let full = match (w["full_in_seconds"].as_f64(), w["full_by"].as_str()) {
            (Some(s), Some(by)) => format!(
                ": buffer full ({by}) in {} at this rate",
                crate::admin::wear::human_duration(s)
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "buffer    growing {}/h ({:.1} events/s){full}",
            decimal(growth * 3600.0),
            w["backlog_events_per_second"].as_f64().unwrap_or(0.0),
        );
    }
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
    if let Some(p) = up["protocol"].as_str().filter(|p| !p.is_empty()) {
        let _ = writeln!(o, "          MQTT {p}");
    }
    if let Some(d) = up["drain"].as_object() {
        let eta = match d.get("eta_seconds").and_then(|e| e.as_f64()) {
            Some(s) => format!(", done in about {}", human_secs(s)),
            None => String::new(),
        };
        let _ = writeln!(
            o,
            "drain     {} of {} backlog events left, {} ev/s{eta} ({}, drain_rate {})",
            d["backlog_left"],
            d["backlog_total"],
            d["events_per_second"],
            d["mode"].as_str().unwrap_or("?"),
            d["rate_limit"].as_str().unwrap_or("?"),
        );
    }
    if let Some(r) = up["rejected"].as_object().filter(|r| !r.is_empty()) {
        let parts: Vec<String> = r.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(
            o,
            "refused   {} — last: {}",
            parts.join("  "),
            up["last_rejection"].as_str().unwrap_or("")
        );
    }
    for sk in v["sinks"].as_array().into_iter().flatten() {
        if sk["name"] == crate::store::sinks::UPSTREAM {
            continue; // the upstream lines above
        }
        let err = sk["last_error"].as_str().unwrap_or("");
        let _ = writeln!(
            o,
            "sink      {} ({}): {}, {} forwarded, {} dead-lettered{}",
            sk["name"].as_str().unwrap_or("?"),
            sk["kind"].as_str().unwrap_or("?"),
            sk["state"].as_str().unwrap_or("?"),
            sk["forwarded"],
            sk["dead_lettered"],
            if err.is_empty() {
                String::new()
            } else {
                format!(" — {err}")
            }
        );
    }
    if let Some(c) = v["commands"].as_object() {
        let results: Vec<String> = c["results"]
            .as_object()
            .map(|r| r.iter().map(|(k, n)| format!("{k} {n}")).collect())
            .unwrap_or_default();
        let err = c["last_error"].as_str().unwrap_or("");
        let _ = writeln!(
            o,
            "commands  {}, received {}  {}  pending {}{}{}",
            if c["connected"].as_bool() == Some(true) {
                "subscribed"
            } else {
                "not connected"
            },
            c["received"],
            results.join("  "),
            c["pending"],
            match c["last"].as_str().filter(|l| !l.is_empty()) {
                Some(l) => format!(" — last: {l}"),
                None => String::new(),
            },
            if err.is_empty() {
                String::new()
            } else {
                format!(" — {err}")
            }
        );
    }
    if running {
        let _ = writeln!(
            o,
            "events    ingested {}  committed {}  forwarded {}",
            v["ingested"], v["committed"], v["forwarded"]
        );
    }
    if running {
        wear_lines(&mut o, v);
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

/// Seconds for people: `45s`, `12m`, `3.5h`.
fn human_secs(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0}s")
    } else if s < 5400.0 {
        format!("{:.0}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(wear: Value, window: f64) -> Value {
        json!({
            "gateway": "gw", "running": true, "uptime_seconds": 700,
            "backlog_events": 0, "backlog_bytes": 0, "oldest_age_seconds": 0.0,
            "upstream": {"state": "offline", "last_error": ""},
            "ingested": 1, "committed": 1, "forwarded": 0,
            "dlq_events": 0, "dlq_bytes": 0, "rules": [],
            "commit_window_seconds": window,
            "budget_spent": window > 0.005,
            "wear": wear,
        })
    }

    #[test]
    fn the_forecast_reads_at_a_glance() {
        let f = crate::admin::wear::Forecast {
            span_seconds: 600.0,
            bytes_per_second: 13_888.9,
            bytes_per_event: Some(1388.9),
            commits_per_second: 0.35,
            events_per_second: 10.0,
            bytes_per_day: 1.2e9,
            write_budget: 1_000_000_000,
            card_life_years: Some(68.5),
            backlog_bytes_per_second: 2_500.0,
            backlog_events_per_second: 10.0,
            full_in_seconds: Some(12_000.0),
            full_by: Some("max_bytes"),
        };
        let out = render(&doc(serde_json::to_value(&f).unwrap(), 2.8));
        for want in [
            "wear      1.2 GB/day written at this rate (1.4 kB per event, 0.35 commits/s); over the 1.0 GB/day budget by 20%",
            "          card life about 68.5 years at this rate",
            "          commits wait 2.8 s for more events (the write budget is spent)",
            "buffer    growing 9.0 MB/h (10.0 events/s): buffer full (max_bytes) in 3 h 20 min at this rate",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }

    #[test]
    fn without_endurance_or_growth_it_says_what_to_set_and_no_more() {
        let f = crate::admin::wear::Forecast {
            span_seconds: 600.0,
            bytes_per_day: 0.5e9,
            write_budget: 1_000_000_000,
            backlog_bytes_per_second: -100.0,
            ..Default::default()
        };
        let out = render(&doc(serde_json::to_value(&f).unwrap(), 0.005));
        assert!(out.contains("within the 1.0 GB/day budget"), "{out}");
        assert!(out.contains("set [buffer] card_endurance"), "{out}");
        assert!(!out.contains("commits wait"), "{out}");
        assert!(!out.contains("growing"), "{out}");
        let early = render(&doc(
            serde_json::to_value(crate::admin::wear::Forecast::default()).unwrap(),
            0.0,
        ));
        assert!(early.contains("wear      measuring"), "{early}");
    }
}
