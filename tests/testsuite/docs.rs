//! The operator docs stay true: `docs/configuration.md` is generated from `config/taskcred.toml`
//! (every key, its default and its comment; regenerate with `TASKCRED_REGENERATE_DOCS=1 cargo
//! test --test docs`), and every worked example of the policy guide (`docs/policies/*/`) is a
//! policy set the broker accepts.
use std::fmt::Write as _;
use std::path::Path;

/// One key of the reference configuration.
struct Key {
    name: String,
    value: String,
    set: bool,
    what: Vec<String>,
}

/// One `[section]` (or `[[array]]`) with the comment before it and its keys.
struct Section {
    header: String,
    intro: Vec<String>,
    keys: Vec<Key>,
}

fn is_key_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Reads config/taskcred.toml as its comments describe it: keys set (their value is the
/// default) and keys commented out (optional; their value is an example).
fn parse(text: &str) -> (Vec<String>, Vec<Section>) {
    let mut preamble = Vec::new();
    let mut sections: Vec<Section> = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(raw) = lines.next() {
        let line = raw.trim();
        if line.is_empty() {
            if sections.is_empty() {
                preamble.append(&mut pending);
            }
            pending.clear();
            continue;
        }
        let body = line.strip_prefix('#').map_or(line, str::trim);
        let commented = line.starts_with('#');
        if body.starts_with('[') && body.ends_with(']') && !body.contains(' ') {
            sections.push(Section {
                header: body.to_owned(),
                intro: std::mem::take(&mut pending),
                keys: Vec::new(),
            });
            continue;
        }
        let key = body
            .split_once('=')
            .map(|(n, r)| (n.trim(), r.trim()))
            .filter(|(n, _)| is_key_name(n) && !sections.is_empty());
        if let Some((name, rest)) = key {
            let (mut value, inline) = match rest.split_once("  #") {
                Some((v, c)) => (v.trim().to_owned(), Some(c.trim().to_owned())),
                None => (rest.to_owned(), None),
            };
            // A list over several lines.
            if value.starts_with('[') && !value.contains(']') {
                for more in lines.by_ref() {
                    let more = more.trim().trim_start_matches('#').trim();
                    value.push(' ');
                    value.push_str(more);
                    if more.contains(']') {
                        break;
                    }
                }
            }
            let mut what = std::mem::take(&mut pending);
            what.extend(inline);
            // Continuation of an inline comment: `#      # more`.
            while let Some(next) = lines.peek() {
                let next = next.trim();
                match next.strip_prefix('#').map(str::trim) {
                    Some(cont) if cont.starts_with('#') => {
                        what.push(cont.trim_start_matches('#').trim().to_owned());
                        lines.next();
                    }
                    _ => break,
                }
            }
            let section = sections.last_mut().unwrap();
            section.keys.push(Key {
                name: name.to_owned(),
                value,
                set: !commented,
                what,
            });
            continue;
        }
        pending.push(body.to_owned());
    }
    (preamble, sections)
}

fn render(text: &str) -> String {
    let (preamble, sections) = parse(text);
    let mut out = String::from(
        "# Configuration reference\n\n\
         <!-- Generated from config/taskcred.toml by tests/testsuite/docs.rs: edit that file, then run\n\
         TASKCRED_REGENERATE_DOCS=1 cargo test --test testsuite docs:: -->\n\n\
         Every key the broker reads, by section, from `config/taskcred.toml` (which is itself a\n\
         valid configuration with these defaults). A key with a default may be left out. A key\n\
         commented out in the file is optional: its value there is an example, or its default\n\
         when its description says so.\n\n",
    );
    for l in &preamble {
        out.push_str(l);
        out.push('\n');
    }
    out.push('\n');
    for s in &sections {
        let _ = writeln!(out, "## `{}`\n", s.header);
        if !s.intro.is_empty() {
            let _ = writeln!(out, "{}\n", s.intro.join(" "));
        }
        if s.keys.is_empty() {
            continue;
        }
        out.push_str("| key | default | what |\n|---|---|---|\n");
        for k in &s.keys {
            let default = if k.set {
                format!("`{}`", k.value)
            } else {
                format!("optional (commented out: `{}`)", k.value)
            };
            let _ = writeln!(
                out,
                "| `{}` | {} | {} |",
                k.name,
                default.replace('|', "\\|"),
                k.what.join(" ").replace('|', "\\|")
            );
        }
        out.push('\n');
    }
    out
}

#[test]
fn the_configuration_reference_is_generated_from_the_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("config/taskcred.toml")).unwrap();
    let generated = render(&example);
    let doc = root.join("docs/configuration.md");
    if std::env::var_os("TASKCRED_REGENERATE_DOCS").is_some() {
        std::fs::write(&doc, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&doc).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/configuration.md is not generated from config/taskcred.toml: run \
         TASKCRED_REGENERATE_DOCS=1 cargo test --test testsuite docs::"
    );
    // Every key the example sets is in the reference, and the reference is not empty.
    let (_, sections) = parse(&example);
    let keys: usize = sections.iter().map(|s| s.keys.len()).sum();
    assert!(keys >= 40, "{keys} keys");
    for s in &sections {
        for k in &s.keys {
            assert!(
                committed.contains(&format!("| `{}` |", k.name)),
                "{}",
                k.name
            );
        }
    }
}

#[test]
fn the_policy_guides_examples_are_accepted() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let (code, out, err) = crate::common::run(&["policy", "check", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {out}{err}", dir.display());
        checked += 1;
    }
    assert!(checked >= 3, "{checked} example policy sets");
}

/// The shell blocks of `docs/production.md` marked `<!-- checked: NAME -->`, in order.
fn checked_blocks(text: &str) -> Vec<(String, String)> {
    text.split("<!-- checked: ")
        .skip(1)
        .map(|rest| {
            let (name, after) = rest.split_once(" -->").unwrap();
            let body = after
                .split_once("```sh\n")
                .unwrap()
                .1
                .split_once("```")
                .unwrap()
                .0;
            (name.to_owned(), body.to_owned())
        })
        .collect()
}

/// The production bootstrap runs as written: the PKI made with openssl, the policies for one's
/// own trust domain and the configuration pointing at them pass `config check`, with no warning.
#[test]
fn the_production_bootstrap_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docs/production.md")).unwrap();
    let blocks = checked_blocks(&text);
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["pki", "policies", "config"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in &blocks {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(body)
            .current_dir(dir.path())
            .env("TASKCRED_SRC", root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "block {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let found = crate::common::config_check_json(&dir.path().join("taskcred.toml"));
    assert_eq!(
        found["found"]["trust_domains"],
        serde_json::json!(["example.org"])
    );
    assert_eq!(found["found"]["issuing_ca"], true);
    assert_eq!(found["found"]["warnings"], serde_json::json!([]), "{found}");
}
