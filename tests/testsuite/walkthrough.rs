//! The README's walkthrough, run as written against a dev broker: every `cargo run --release --`
//! command of its console blocks (from "## Walkthrough" to the CI section), with the shell's own
//! quoting, `$ID`/`$TOKEN` variables and `$(...)`, and the `curl` commands, in a scratch
//! directory holding the broker's `.taskcred-dev`. `cargo run --release --` stands for the
//! binary built for the tests; the task ids the README shows stand for the ids the broker
//! printed in their place. Each command must end as the README shows it: an `error:` line where
//! it shows one (with the same code and reason), success and output of the same shape (first
//! word, JSON key, or id) otherwise; a stream (`revocations watch`) is read for 8 seconds.
//!
//! Not run: `grpcurl` (a third-party tool the machine may not have; reflection and health are
//! tested in `mtls`) and the block of the `resource_server` example (it needs the example built;
//! its doc comment holds the same session and `verify` tests it).
use std::collections::HashMap;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{BIN, ServeProcess};

/// One `$` command of a console block and the lines the README shows after it.
#[derive(Debug)]
struct Step {
    command: String,
    shown: Vec<String>,
    /// The block runs a program the test does not (see the module docs).
    not_run: bool,
}

/// The steps of the walkthrough's console blocks.
fn steps(readme: &str) -> Vec<Step> {
    let start = readme.find("\n## Walkthrough").expect("a walkthrough");
    let end = readme[start..]
        .find("\n### CI pipelines")
        .map_or(readme.len(), |e| start + e);
    let mut steps: Vec<Step> = Vec::new();
    let mut lines = readme[start..end].lines();
    while let Some(line) = lines.next() {
        let Some(indent) = line.find("```console") else {
            continue;
        };
        let mut block: Vec<Step> = Vec::new();
        let mut continued = false;
        for line in lines.by_ref() {
            let line = line.get(indent..).unwrap_or("").trim_end();
            if line.starts_with("```") {
                break;
            }
            if continued {
                let last = block.last_mut().unwrap();
                last.command.push(' ');
                last.command
                    .push_str(line.trim_start().trim_end_matches('\\').trim_end());
                continued = line.ends_with('\\');
            } else if let Some(command) = line.strip_prefix("$ ") {
                continued = command.ends_with('\\');
                block.push(Step {
                    command: command.trim_end_matches('\\').trim_end().to_owned(),
                    shown: Vec::new(),
                    not_run: false,
                });
            } else if let Some(step) = block.last_mut() {
                step.shown.push(line.to_owned());
            }
        }
        let example = block
            .iter()
            .any(|s| s.command.starts_with("cargo run --example"));
        for mut step in block {
            step.not_run = example || step.command.starts_with("grpcurl ");
            steps.push(step);
        }
    }
    steps
}

fn is_id(word: &str) -> bool {
    word.len() == 36
        && word.chars().enumerate().all(|(i, c)| {
            matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
        })
}

/// What a first line of output must share with the README's: a JSON object's first key (and
/// its value when it is a boolean), an id, or the first word.
fn shape(line: &str) -> String {
    if line.starts_with('{') {
        let (key, rest) = line.split_once(':').unwrap_or((line, ""));
        return match rest.split([',', '}']).next() {
            Some(v @ ("true" | "false")) => format!("{key}:{v}"),
            _ => key.to_owned(),
        };
    }
    let word = line
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_end_matches(':');
    if is_id(word) {
        "<id>".into()
    } else {
        word.into()
    }
}

/// An error line's code and reason: `error: broker refused: PERMISSION_DENIED (POLICY_DENIED)`.
fn error_shape(line: &str) -> String {
    line.splitn(4, ": ").take(3).collect::<Vec<_>>().join(": ")
}

/// The id a command's output gives (its first word, or a JSON object's `id`).
fn id_in(output: &str) -> Option<String> {
    let first = output.lines().next()?;
    if let Some(rest) = first.strip_prefix("{\"id\":\"") {
        return rest.split('"').next().map(str::to_owned);
    }
    let word = first.split_whitespace().next()?;
    is_id(word).then(|| word.to_owned())
}

/// Runs `command` in bash in `dir`, `cargo run --release --` being the test binary; a command
/// still running after `limit` is stopped (a stream). Returns (exit code, None if stopped;
/// stdout; stderr).
fn run(
    command: &str,
    dir: &std::path::Path,
    env: &HashMap<String, String>,
    limit: Duration,
) -> (Option<i32>, String, String) {
    let script = format!(
        "cargo() {{ [ \"$1 $2 $3\" = 'run --release --' ] || exit 97; shift 3; \"$TASKCRED_BIN\" \"$@\"; }}\n{command}"
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .current_dir(dir)
        .envs(env)
        .env("TASKCRED_BIN", BIN)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            // The whole group: bash and the program it runs.
            let _ = Command::new("kill")
                .args(["-s", "TERM", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, out.join().unwrap(), err.join().unwrap())
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let steps = steps(&readme);
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join(".taskcred-dev");
    let dev_dir = dev.to_str().unwrap();
    // The broker as the walkthrough's first command starts it, on free ports.
    let serve = &steps[0];
    assert_eq!(serve.command, "cargo run --release -- serve --dev");
    let broker = ServeProcess::start(&crate::common::serve_dev_args(dev_dir), &[]);
    let (grpc, http) = (broker.grpc.to_string(), broker.http.to_string());
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("TASKCRED_BROKER".into(), format!("https://{grpc}"));
    let mut ids: Vec<(String, String)> = Vec::new();
    let (mut ran, mut not_run) = (0, Vec::new());
    for step in &steps[1..] {
        if step.not_run {
            not_run.push(step.command.clone());
            continue;
        }
        let mut command = step
            .command
            .replace("127.0.0.1:7443", &grpc)
            .replace("127.0.0.1:7480", &http);
        for (shown, real) in &ids {
            command = command.replace(shown, real);
        }
        // NAME=value and NAME=$(command): the shell's variables, kept across steps.
        if let Some((name, value)) = command
            .split_once('=')
            .filter(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        {
            let value = match value.strip_prefix("$(").and_then(|v| v.strip_suffix(')')) {
                Some(inner) => {
                    let (code, out, err) = run(inner, dir.path(), &env, Duration::from_secs(30));
                    assert_eq!(code, Some(0), "`{inner}` failed: {err}");
                    ran += 1;
                    out.trim().to_owned()
                }
                None => value.to_owned(),
            };
            env.insert(name.to_owned(), value);
            continue;
        }
        assert!(
            command.starts_with("cargo run --release -- ") || command.starts_with("curl "),
            "the walkthrough runs `{command}`, which this test does not know"
        );
        let stream = command.contains("revocations watch");
        let limit = Duration::from_secs(if stream { 8 } else { 30 });
        let (code, out, err) = run(&command, dir.path(), &env, limit);
        ran += 1;
        let said = format!("`{command}`\nexit {code:?}\nstdout:\n{out}\nstderr:\n{err}");
        let first_shown = step.shown.first().map(String::as_str).unwrap_or("");
        if first_shown.starts_with("error:") {
            assert!(code.is_some_and(|c| c != 0), "{said}");
            let first_err = err.lines().next().unwrap_or("");
            assert_eq!(error_shape(first_err), error_shape(first_shown), "{said}");
            continue;
        }
        if stream {
            assert_eq!(code, None, "the stream ended: {said}");
        } else if first_shown == r#"{"active":false}"# {
            // As the README documents: `introspect` of a credential not active exits 3.
            assert_eq!(code, Some(3), "{said}");
        } else {
            assert_eq!(code, Some(0), "{said}");
        }
        if !first_shown.is_empty() {
            let first_out = out.lines().next().unwrap_or("");
            assert_eq!(shape(first_out), shape(first_shown), "{said}");
        }
        if let (Some(shown), Some(real)) = (id_in(&step.shown.join("\n")), id_in(&out)) {
            ids.push((shown, real));
        }
    }
    assert!(ran >= 20, "only {ran} commands ran");
    eprintln!("walkthrough: {ran} commands ran; not run (see the module docs): {not_run:#?}");
    drop(broker);
}
