//! `taskcred doctor`: checks, from the client's side, what a first connection needs, and says
//! what is wrong in words: the broker's address, the CA bundle, the client certificate (its
//! X509-SVID profile and validity), and a real handshake and `WhoAmI` (a refusal explained).

use std::process::ExitCode;
use std::time::SystemTime;

use serde_json::{Value, json};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::ClientArgs;
use super::shared::{answer, open};
use crate::api::pb::WhoAmIRequest;
use crate::api::pb::identity_service_client::IdentityServiceClient;
use crate::client::{explained, identity_files, read};

/// One check: its name, whether it passed, and what was found or is wrong.
struct Check {
    name: &'static str,
    ok: bool,
    said: String,
}

/// Runs the checks, prints one line each (or one JSON object), and exits 0 when all pass, 1
/// otherwise.
pub async fn run(args: &ClientArgs) -> ExitCode {
    let mut checks = vec![address(args), bundle(args)];
    match identity_files(args) {
        Ok(Some((cert, _))) => checks.push(svid(&cert)),
        Ok(None) => checks.push(Check {
            name: "client certificate",
            ok: true,
            said: "none given (--as NAME, or --cert and --key): only the public RPCs answer".into(),
        }),
        Err(e) => checks.push(Check {
            name: "client certificate",
            ok: false,
            said: e.to_string(),
        }),
    }
    checks.push(whoami(args).await);
    let all = checks.iter().all(|c| c.ok);
    if args.json {
        let list: Vec<Value> = checks
            .iter()
            .map(|c| json!({"check": c.name, "ok": c.ok, "said": c.said}))
            .collect();
        crate::outln!("{}", json!({"ok": all, "checks": list}));
    } else {
        for c in &checks {
            crate::outln!(
                "{} {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.said
            );
        }
    }
    if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::client::EXIT_REFUSED)
    }
}

fn address(args: &ClientArgs) -> Check {
    let ok = args.broker.starts_with("https://") && args.broker.parse::<http::Uri>().is_ok();
    Check {
        name: "broker address",
        ok,
        said: if ok {
            args.broker.clone()
        } else {
            format!(
                "{}: not an https:// URL (the broker speaks TLS only)",
                args.broker
            )
        },
    }
}

fn bundle(args: &ClientArgs) -> Check {
    let path = args
        .ca
        .clone()
        .unwrap_or_else(|| args.dev_dir.join(crate::devpki::CA_CERT));
    let said = read("CA bundle", &path)
        .map_err(|e| e.to_string())
        .and_then(|pem| match crate::identity::bundle::parse(&pem) {
            Ok(certs) if !certs.is_empty() => Ok(format!(
                "{}: {} CA certificate(s)",
                path.display(),
                certs.len()
            )),
            Ok(_) => Err(format!("{}: no certificate in it", path.display())),
            Err(e) => Err(format!("{}: {e}", path.display())),
        });
    Check {
        name: "CA bundle",
        ok: said.is_ok(),
        said: said.unwrap_or_else(|e| e),
    }
}

/// The client certificate against the X509-SVID profile the broker requires.
fn svid(path: &std::path::Path) -> Check {
    let checked = (|| -> Result<String, String> {
        let pem = read("client certificate", path).map_err(|e| e.to_string())?;
        let der = crate::identity::bundle::parse(&pem)
            .map_err(|_| format!("{}: not a PEM certificate", path.display()))?
            .into_iter()
            .next()
            .ok_or("no certificate in the file")?;
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let validity = cert.validity();
        if now < validity.not_before.timestamp() {
            problems.push(format!("not valid before {}", validity.not_before));
        }
        if now > validity.not_after.timestamp() {
            problems.push(format!("expired {}", validity.not_after));
        }
        let uris: Vec<&str> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let id = match uris.as_slice() {
            [one] if one.starts_with("spiffe://") => (*one).to_owned(),
            [] => {
                problems.push("no URI SAN: an X509-SVID has one, spiffe://<domain>/<path>".into());
                String::new()
            }
            _ => {
                problems.push(format!(
                    "{} URI SANs: an X509-SVID has exactly one",
                    uris.len()
                ));
                String::new()
            }
        };
        if cert.is_ca() {
            problems.push("a CA certificate, not a leaf".into());
        }
        if !cert
            .key_usage()
            .ok()
            .flatten()
            .is_some_and(|k| k.value.digital_signature())
        {
            problems.push("key usage lacks digitalSignature".into());
        }
        if !cert
            .extended_key_usage()
            .ok()
            .flatten()
            .is_some_and(|e| e.value.client_auth)
        {
            problems.push("extended key usage lacks clientAuth".into());
        }
        if problems.is_empty() {
            Ok(format!(
                "{id}, valid until {} (issuer {})",
                validity.not_after,
                cert.issuer()
            ))
        } else {
            Err(format!("{}: {}", path.display(), problems.join("; ")))
        }
    })();
    Check {
        name: "client certificate",
        ok: checked.is_ok(),
        said: checked.unwrap_or_else(|e| e),
    }
}

/// A real connection: the identity the broker sees, or why it refused.
async fn whoami(args: &ClientArgs) -> Check {
    let result = async {
        let mut client = open(args, IdentityServiceClient::new).await?;
        answer(client.who_am_i(WhoAmIRequest {})).await
    }
    .await;
    match result {
        Ok(me) => Check {
            name: "handshake and WhoAmI",
            ok: true,
            said: format!("the broker knows you as {}", me.spiffe_id),
        },
        Err(e) => Check {
            name: "handshake and WhoAmI",
            ok: false,
            said: explained(args, e).await.to_string(),
        },
    }
}
