//! `tidepool check`: everything `run` would refuse at start, found without running.
//!
//! The config (keys, values, renamed keys), the upstream TLS files, the admin token file, every
//! `[[ingest.serial]] path`, and every rule compiled with the `[rules]` limits the live rule
//! stage uses. Each problem is one line naming the file, the line or key and what would be
//! right; any problem means exit 1.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, Config};

/// What a check found.
#[derive(Debug, Default)]
pub struct Findings {
    /// Accepted, but worth changing (renamed keys); printed as `warning: ...`.
    pub warnings: Vec<String>,
    /// Problems; any makes `check` exit 1.
    pub errors: Vec<String>,
    /// The config, when it loaded.
    pub config: Option<Config>,
}

/// Checks the config at `path` (the built-in defaults when `None`).
pub fn check(path: Option<&Path>) -> Findings {
    let mut f = Findings::default();
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            f.errors.push(e.to_string());
            return f;
        }
    };
    let name = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in defaults".into());
    let text = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let at = |key: &str| match config::find_line(&text, key) {
        Some(l) => format!("{name}:{l}"),
        None => name.clone(),
    };
    f.warnings.extend(cfg.warnings.iter().cloned());
    if cfg
        .upstream
        .url
        .as_deref()
        .is_some_and(|u| u.starts_with("mqtts://"))
    {
        if let Err(e) = crate::forward::tls::client_config(&cfg.upstream) {
            f.errors.push(format!("{name}: {e}"));
        }
    }
    for (i, s) in cfg.sinks.iter().enumerate() {
        if s.url.starts_with("mqtts://") || s.url.starts_with("https://") {
            if let Err(e) = crate::forward::tls::client_config(&s.upstream_config()) {
                let e = crate::forward::tls::error_for(&e, &format!("sink[{i}]"));
                f.errors.push(format!(
                    "{}: sink `{}`: {e}",
                    at(&format!("sink[{i}].ca_file")),
                    s.name
                ));
            }
        }
    }
    if let Err(e) = cfg.admin.token() {
        f.errors.push(format!("{}: {e}", at("admin.token_file")));
    }
    for (i, port) in cfg.ingest.serial.iter().enumerate() {
        if !port.path.exists() {
            let key = format!("ingest.serial[{i}].path");
            f.errors.push(format!(
                "{}: key `{key}`: serial port `{}` ({}) does not exist; plug the device in or fix the path (when running, a port that goes away is retried)",
                at(&key),
                port.path.display(),
                port.name
            ));
        }
    }
    if cfg.rules.dir.exists() {
        let limits = crate::rules::limits(&cfg.rules);
        if let Err(errs) = tidepool_rules::RuleSet::load(&cfg.rules.dir, limits) {
            f.errors.extend(errs.iter().map(|e| e.to_string()));
        }
    }
    f.config = Some(cfg);
    f
}

/// `tidepool check [--config FILE] [--print-defaults]`: prints the findings (or the defaults)
/// and the exit code says whether the config is good.
pub fn main(path: Option<&Path>, print_defaults: bool) -> ExitCode {
    if print_defaults {
        print!("{}", config::DEFAULTS);
        return ExitCode::SUCCESS;
    }
    let f = check(path);
    for w in &f.warnings {
        eprintln!("warning: {w}");
    }
    for e in &f.errors {
        eprintln!("error: {e}");
    }
    let Some(cfg) = f.config.filter(|_| f.errors.is_empty()) else {
        return ExitCode::from(1);
    };
    println!(
        "{}: ok",
        path.map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults".into())
    );
    for (k, v) in config::summary(&cfg) {
        println!("  {k} = {v}");
    }
    ExitCode::SUCCESS
}
