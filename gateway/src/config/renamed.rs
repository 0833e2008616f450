//! Keys that a later version renamed or removed, still accepted so an upgraded unit never
//! lands in a restart loop.
//!
//! [`RENAMED`] is applied to the user's file before it is merged over the defaults: a renamed
//! key's value moves to its new name, a removed key is taken out, and each gives one warning
//! naming the replacement (`tidepool run` logs it at WARN, `tidepool check` prints it). An
//! entry stays for at least one release after the change, then may go (the key is then
//! unknown, and refused like any typo).

/// One renamed or removed key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Renamed {
    /// The old dotted path, e.g. `upstream.batch_wait`; `serial[]` stands for every
    /// `[[ingest.serial]]` table, as in `ingest.serial[].old_key`.
    pub old: &'static str,
    /// The new dotted path (same `[]` parts as `old`), or `None` when the key was removed.
    pub new: Option<&'static str>,
    /// The version that made the change.
    pub since: &'static str,
    /// For a removed key: what to do instead (one clause).
    pub note: &'static str,
}

/// Every key renamed or removed so far.
pub(crate) const RENAMED: &[Renamed] = &[Renamed {
    old: "ingest.mqtt.broker_memory",
    new: None,
    since: "0.2.0",
    note: "the embedded broker no longer holds unacknowledged messages in memory (sensors wait for the commit); local subscribers' queues are capped by `ingest.mqtt.max_queued_messages`",
}];

/// One step of a concrete path in a TOML document.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// `a.b[].c` → [("a", false), ("b", true), ("c", false)].
fn pattern(path: &str) -> Vec<(&str, bool)> {
    path.split('.')
        .map(|p| match p.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (p, false),
        })
        .collect()
}

/// Every concrete path matching `pat` that exists in `t`, in document order.
fn expand(t: &toml::Table, pat: &[(&str, bool)]) -> Vec<Vec<Seg>> {
    let Some(((key, many), rest)) = pat.split_first() else {
        return vec![Vec::new()];
    };
    let Some(v) = t.get(*key) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |prefix: Vec<Seg>, v: &toml::Value| {
        if rest.is_empty() {
            out.push(prefix);
        } else if let toml::Value::Table(inner) = v {
            for tail in expand(inner, rest) {
                let mut p = prefix.clone();
                p.extend(tail);
                out.push(p);
            }
        }
    };
    match (many, v) {
        (true, toml::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                push(vec![Seg::Key(key.to_string()), Seg::Index(i)], item);
            }
        }
        (false, v) => push(vec![Seg::Key(key.to_string())], v),
        _ => {}
    }
    out
}

/// `new`'s pattern with the array indices of `old_path` filled in.
fn instantiate(new: &[(&str, bool)], old_path: &[Seg]) -> Vec<Seg> {
    let mut indices = old_path.iter().filter_map(|s| match s {
        Seg::Index(i) => Some(*i),
        Seg::Key(_) => None,
    });
    let mut out = Vec::new();
    for (key, many) in new {
        out.push(Seg::Key(key.to_string()));
        if *many {
            out.push(Seg::Index(indices.next().unwrap_or(0)));
        }
    }
    out
}

/// `ingest.serial[0].path`, as serde and messages spell it.
fn render(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The table holding the last step of `path`, creating tables on the way when `create`.
fn parent_mut<'a>(
    t: &'a mut toml::Table,
    path: &[Seg],
    create: bool,
) -> Option<&'a mut toml::Table> {
    let mut cur = t;
    let mut i = 0;
    while i + 1 < path.len() {
        let Seg::Key(k) = &path[i] else { return None };
        if create && !cur.contains_key(k) {
            cur.insert(k.clone(), toml::Value::Table(toml::Table::new()));
        }
        let mut v = cur.get_mut(k)?;
        if let Some(Seg::Index(n)) = path.get(i + 1) {
            v = v.as_array_mut()?.get_mut(*n)?;
            i += 1;
        }
        cur = v.as_table_mut()?;
        i += 1;
    }
    Some(cur)
}

fn leaf(path: &[Seg]) -> Option<&str> {
    match path.last() {
        Some(Seg::Key(k)) => Some(k),
        _ => None,
    }
}

/// Applies `table` to the user's document `doc` (named `name`, source `text` for line numbers);
/// returns one warning per old key found.
pub(crate) fn apply(
    doc: &mut toml::Table,
    table: &[Renamed],
    name: &str,
    text: &str,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for r in table {
        let old_pat = pattern(r.old);
        for old_path in expand(doc, &old_pat) {
            let old_key = render(&old_path);
            let origin = match super::find_line(text, &old_key) {
                Some(l) => format!("{name}:{l}"),
                None => name.to_string(),
            };
            let Some(value) =
                parent_mut(doc, &old_path, false).and_then(|p| p.remove(leaf(&old_path)?))
            else {
                continue;
            };
            let Some(new) = r.new else {
                warnings.push(format!(
                    "{origin}: key `{old_key}` is no longer used (removed in {}); {}; remove it",
                    r.since, r.note
                ));
                continue;
            };
            let new_path = instantiate(&pattern(new), &old_path);
            let new_key = render(&new_path);
            let Some(parent) = parent_mut(doc, &new_path, true) else {
                continue;
            };
            let new_leaf = leaf(&new_path).unwrap_or_default().to_string();
            if parent.contains_key(&new_leaf) {
                warnings.push(format!(
                    "{origin}: key `{old_key}` was renamed `{new_key}` in {}; both are set, `{old_key}` is ignored; remove it",
                    r.since
                ));
            } else {
                parent.insert(new_leaf, value);
                warnings.push(format!(
                    "{origin}: key `{old_key}` was renamed `{new_key}` in {}; it still works, but write `{new_key}`",
                    r.since
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made-up entries: no real key has been renamed yet.
    const MADE_UP: &[Renamed] = &[
        Renamed {
            old: "upstream.batch_wait",
            new: Some("upstream.batch_max_wait"),
            since: "0.2.0",
            note: "",
        },
        Renamed {
            old: "buffer.fsync_every",
            new: None,
            since: "0.2.0",
            note: "every commit is fsynced",
        },
        Renamed {
            old: "ingest.serial[].speed",
            new: Some("ingest.serial[].baud"),
            since: "0.2.0",
            note: "",
        },
        Renamed {
            old: "gateway.admin_listen",
            new: Some("admin.listen"),
            since: "0.2.0",
            note: "",
        },
    ];

    fn doc(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn a_renamed_key_moves_with_a_warning_naming_the_replacement() {
        let text = "[upstream]\nurl = \"mqtt://h:1\"\nbatch_wait = \"2s\"\n";
        let mut d = doc(text);
        let w = apply(&mut d, MADE_UP, "t.toml", text);
        assert_eq!(d["upstream"]["batch_max_wait"].as_str(), Some("2s"));
        assert!(d["upstream"].get("batch_wait").is_none());
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "t.toml:3: key `upstream.batch_wait` was renamed `upstream.batch_max_wait`"
            ),
            "{w:?}"
        );
    }

    #[test]
    fn the_new_key_wins_when_both_are_set() {
        let text = "[upstream]\nbatch_wait = \"2s\"\nbatch_max_wait = \"3s\"\n";
        let mut d = doc(text);
        let w = apply(&mut d, MADE_UP, "t.toml", text);
        assert_eq!(d["upstream"]["batch_max_wait"].as_str(), Some("3s"));
        assert!(d["upstream"].get("batch_wait").is_none());
        assert!(w[0].contains("both are set"), "{w:?}");
    }

    #[test]
    fn a_removed_key_is_taken_out_with_what_to_do_instead() {
        let text = "[buffer]\nfsync_every = 10\n";
        let mut d = doc(text);
        let w = apply(&mut d, MADE_UP, "t.toml", text);
        assert!(d["buffer"].as_table().unwrap().is_empty());
        assert_eq!(
            w,
            ["t.toml:2: key `buffer.fsync_every` is no longer used (removed in 0.2.0); every commit is fsynced; remove it"]
        );
    }

    #[test]
    fn keys_in_every_serial_port_and_across_sections() {
        let text = "[gateway]\nadmin_listen = \"127.0.0.1:1\"\n\
                    [[ingest.serial]]\nname = \"a\"\npath = \"/a\"\n\
                    [[ingest.serial]]\nname = \"b\"\npath = \"/b\"\nspeed = 9600\n";
        let mut d = doc(text);
        let w = apply(&mut d, MADE_UP, "t.toml", text);
        let ports = d["ingest"]["serial"].as_array().unwrap();
        assert!(ports[0].get("baud").is_none());
        assert_eq!(ports[1]["baud"].as_integer(), Some(9600));
        assert!(ports[1].get("speed").is_none());
        assert_eq!(d["admin"]["listen"].as_str(), Some("127.0.0.1:1"));
        assert!(d["gateway"].get("admin_listen").is_none());
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w.iter().any(|m| m.starts_with(
                "t.toml:9: key `ingest.serial[1].speed` was renamed `ingest.serial[1].baud`"
            )),
            "{w:?}"
        );
    }

    #[test]
    fn a_file_without_old_keys_is_untouched() {
        let text = "[upstream]\nbatch_max_wait = \"2s\"\n";
        let mut d = doc(text);
        assert!(apply(&mut d, MADE_UP, "t.toml", text).is_empty());
        assert_eq!(d, doc(text));
    }

    #[test]
    fn the_real_table_is_well_formed() {
        for r in RENAMED {
            let (old, new) = (pattern(r.old), r.new.map(pattern));
            let arrays = |p: &[(&str, bool)]| p.iter().filter(|x| x.1).count();
            if let Some(n) = &new {
                assert_eq!(arrays(&old), arrays(n), "{} → {:?}", r.old, r.new);
            } else {
                assert!(
                    !r.note.is_empty(),
                    "a removed key says what to do: {}",
                    r.old
                );
            }
        }
    }

    #[test]
    fn the_loader_accepts_an_old_key_and_keeps_the_warning() {
        let text = "[upstream]\nbatch_wait = \"2s\"\n[buffer]\nfsync_every = 1\n";
        let c = crate::config::Config::from_str_renamed("c.toml", text, MADE_UP).unwrap();
        assert_eq!(
            c.upstream.batch_max_wait.0,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("write `upstream.batch_max_wait`"));
        // Without the entry, the same file is refused as before.
        let e = crate::config::Config::from_str_named("c.toml", text).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
