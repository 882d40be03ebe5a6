//! [`WorkloadId`]: a SPIFFE ID that names a workload, parsed once and never handled as a bare
//! string; [`TrustDomains`]: the set of trust domains the broker accepts.
//!
//! The character rules come from the `spiffe` crate (maxlambrecht/rust-spiffe), which follows
//! SPIFFE-ID.md; added here: the length limits, the rule that a workload ID has a path, and the
//! refusal of anything the crate would normalize (it lowercases a mixed-case trust domain).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use spiffe::{SpiffeId, TrustDomain};

use super::IdentityError;

/// Longest SPIFFE ID accepted (SPIFFE-ID.md 2.3: verifiers accept up to 2048 bytes).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain accepted (SPIFFE-ID.md 2.1: at most 255 bytes).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A validated SPIFFE ID with a non-empty path, naming one workload or person.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    id: SpiffeId,
    text: String,
}

impl WorkloadId {
    /// Parses a SPIFFE ID that names a workload.
    ///
    /// # Errors
    /// [`IdentityError`] when the text breaks a rule of SPIFFE-ID.md section 2 (scheme, trust domain
    /// characters, empty / dot segments, trailing slash, query, fragment, port, userinfo,
    /// percent-encoding), is too long, or has no path.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        if text.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::SpiffeIdTooLong {
                max: MAX_SPIFFE_ID_LEN,
            });
        }
        let id = SpiffeId::new(text).map_err(|e| IdentityError::InvalidSpiffeId(e.to_string()))?;
        if id.trust_domain().as_ref().len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdentityError::TrustDomainTooLong {
                max: MAX_TRUST_DOMAIN_LEN,
            });
        }
        if id.path().is_empty() {
            return Err(IdentityError::NoPath);
        }
        // The crate lowercases a mixed-case trust domain; SPIFFE-ID.md 2.1 makes uppercase
        // invalid, and an identity that is not what the certificate says is no identity.
        let canonical = id.to_string();
        if canonical != text {
            return Err(IdentityError::InvalidSpiffeId(
                "not in canonical form (trust domain must be lowercase)".into(),
            ));
        }
        Ok(Self {
            text: canonical,
            id,
        })
    }

    /// The trust domain, e.g. `taskcred.dev`.
    pub fn trust_domain(&self) -> &str {
        self.id.trust_domain().as_ref()
    }

    /// The path, starting with `/`, e.g. `/agent/demo`.
    pub fn path(&self) -> &str {
        self.id.path()
    }

    /// The whole ID, e.g. `spiffe://taskcred.dev/agent/demo`.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkloadId({})", self.text)
    }
}

impl FromStr for WorkloadId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for WorkloadId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for WorkloadId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The trust domains whose SPIFFE IDs the broker accepts. Never empty once built by
/// [`TrustDomains::parse`]: an empty allow-list would reject everyone, which is a configuration
/// mistake rather than a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomains(BTreeSet<String>);

impl TrustDomains {
    /// Parses a list of trust domain names.
    ///
    /// # Errors
    /// The first name that is not a valid trust domain, or an empty list.
    pub fn parse<I, S>(names: I) -> Result<Self, IdentityError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = BTreeSet::new();
        for name in names {
            let name = name.as_ref();
            // `TrustDomain::new` also accepts a whole SPIFFE ID; an allow-list takes bare names.
            if name.contains(':') || name.contains('/') {
                return Err(IdentityError::InvalidSpiffeId(format!(
                    "{name:?} is not a bare trust domain name"
                )));
            }
            if name.len() > MAX_TRUST_DOMAIN_LEN {
                return Err(IdentityError::TrustDomainTooLong {
                    max: MAX_TRUST_DOMAIN_LEN,
                });
            }
            let td = TrustDomain::new(name)
                .map_err(|e| IdentityError::InvalidSpiffeId(format!("{name:?}: {e}")))?
                .to_string();
            if td != name {
                return Err(IdentityError::InvalidSpiffeId(format!(
                    "{name:?}: a trust domain is lowercase"
                )));
            }
            set.insert(td);
        }
        if set.is_empty() {
            return Err(IdentityError::InvalidSpiffeId(
                "the list of allowed trust domains is empty".into(),
            ));
        }
        Ok(Self(set))
    }

    /// Whether `id` belongs to an allowed trust domain.
    pub fn allows(&self, id: &WorkloadId) -> bool {
        self.0.contains(id.trust_domain())
    }

    /// The allowed names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_workload_id() {
        let id = WorkloadId::parse("spiffe://taskcred.dev/agent/demo").unwrap();
        assert_eq!(id.trust_domain(), "taskcred.dev");
        assert_eq!(id.path(), "/agent/demo");
        assert_eq!(id.to_string(), "spiffe://taskcred.dev/agent/demo");
    }

    #[test]
    fn path_is_case_sensitive_and_allows_spec_characters() {
        let a = WorkloadId::parse("spiffe://ex.org/Agent/a-b_c.d").unwrap();
        let b = WorkloadId::parse("spiffe://ex.org/agent/a-b_c.d").unwrap();
        assert_ne!(a, b);
    }

    /// Every bad input of STANDARDS.md A, plus the other rules of SPIFFE-ID.md section 2.
    #[test]
    fn rejects_every_bad_input_of_the_spec() {
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        let cases: &[(&str, &str)] = &[
            ("uppercase trust domain", "spiffe://Example.org/a"),
            ("port", "spiffe://ex.org:443/a"),
            ("empty segment", "spiffe://ex.org/a//b"),
            ("trailing slash", "spiffe://ex.org/a/"),
            ("percent-encoding", "spiffe://ex.org/%41"),
            ("query", "spiffe://ex.org/a?x=1"),
            ("fragment", "spiffe://ex.org/a#f"),
            ("userinfo", "spiffe://user@ex.org/a"),
            ("dot segment", "spiffe://ex.org/a/./b"),
            ("dot-dot segment", "spiffe://ex.org/a/../b"),
            ("other scheme", "https://ex.org/a"),
            ("uppercase scheme", "SPIFFE://ex.org/a"),
            ("empty trust domain", "spiffe:///a"),
            ("empty", ""),
            ("no path", "spiffe://ex.org"),
            ("only a slash", "spiffe://ex.org/"),
            ("bad path char", "spiffe://ex.org/a b"),
            ("non-ascii", "spiffe://ex.org/é"),
            ("256-byte trust domain", &long_td),
        ];
        for (defect, input) in cases {
            assert!(
                WorkloadId::parse(input).is_err(),
                "{defect}: {input:?} was accepted"
            );
        }
    }

    #[test]
    fn length_limits() {
        let td255 = "a".repeat(255);
        assert!(WorkloadId::parse(&format!("spiffe://{td255}/x")).is_ok());
        let path = "/a".repeat((MAX_SPIFFE_ID_LEN - "spiffe://ex.org".len()) / 2);
        let at_limit = format!("spiffe://ex.org{path}");
        assert!(at_limit.len() <= MAX_SPIFFE_ID_LEN);
        assert!(WorkloadId::parse(&at_limit).is_ok());
        let over = format!("{at_limit}/bb");
        assert_eq!(
            WorkloadId::parse(&over),
            Err(IdentityError::SpiffeIdTooLong {
                max: MAX_SPIFFE_ID_LEN
            })
        );
    }

    #[test]
    fn trust_domain_allow_list() {
        let tds = TrustDomains::parse(["taskcred.dev", "prod.example.com"]).unwrap();
        assert!(tds.allows(&WorkloadId::parse("spiffe://taskcred.dev/a").unwrap()));
        assert!(!tds.allows(&WorkloadId::parse("spiffe://evil.dev/a").unwrap()));
        // A suffix or prefix of an allowed domain is another domain.
        assert!(!tds.allows(&WorkloadId::parse("spiffe://dev/a").unwrap()));
        assert!(!tds.allows(&WorkloadId::parse("spiffe://xtaskcred.dev/a").unwrap()));
    }

    #[test]
    fn trust_domain_list_rejects_bad_names() {
        assert!(TrustDomains::parse(Vec::<String>::new()).is_err());
        assert!(TrustDomains::parse(["Example.org"]).is_err());
        assert!(TrustDomains::parse(["spiffe://ex.org"]).is_err());
        assert!(TrustDomains::parse(["ex.org:443"]).is_err());
        assert!(TrustDomains::parse(["a".repeat(256)]).is_err());
    }
}
