//! The files that decide whom the broker trusts (the config, trust bundles, the policies, CI
//! issuers' keys) and who may change them. Whoever can replace such a file can make the broker
//! trust them, so one is refused unless the broker's own user (or root) owns it and nobody else
//! can write it or swap it: not the file, and not any directory on its path (a directory others
//! may write lets them rename a file of their own over it), unless that directory is sticky
//! (others may not rename what they do not own there) or the file system is read-only (a
//! Kubernetes ConfigMap mount, whatever its modes).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Why a file may not be trusted. The message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileTrustError {
    /// It cannot be read.
    #[error("{0}")]
    Unreadable(String),
    /// Its group or others may write it.
    #[error(
        "writable by group or others (mode {0:o}): whoever can write it decides whom the broker trusts; run chmod go-w on it"
    )]
    Writable(u32),
    /// Another user owns it (it could rewrite it).
    #[error(
        "owned by uid {0}, neither root nor the broker's user: its owner decides whom the broker trusts"
    )]
    Owner(u32),
    /// A directory on its path lets others swap it.
    #[error(
        "directory {path} lets others replace what is in it (mode {mode:o}, uid {uid}): make it owned by root or the broker's user and not writable by group or others"
    )]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Its owner.
        uid: u32,
    },
}

fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

/// Whether `path` is on a file system mounted read-only (nobody can change it there).
fn read_only(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// Checks that `path` (a file or a directory) may be trusted; see the module docs.
///
/// # Errors
/// [`FileTrustError`] saying why not.
pub fn check_trusted(path: &Path) -> Result<(), FileTrustError> {
    let unreadable = |e: std::io::Error| FileTrustError::Unreadable(e.to_string());
    if read_only(path) {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(FileTrustError::Writable(mode));
    }
    if !trusted_uid(meta.uid()) {
        return Err(FileTrustError::Owner(meta.uid()));
    }
    // The directories as written (a symbolic link lives in one of them) and as resolved.
    let resolved = std::fs::canonicalize(path).map_err(unreadable)?;
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().map_err(unreadable)?.join(path)
    };
    for start in [absolute.as_path(), resolved.as_path()] {
        for dir in start.ancestors().skip(1) {
            let Ok(d) = std::fs::symlink_metadata(dir) else {
                continue;
            };
            let (mode, uid) = (d.mode() & 0o7777, d.uid());
            let sticky = mode & 0o1000 != 0;
            if !trusted_uid(uid) || (mode & 0o022 != 0 && !sticky) {
                return Err(FileTrustError::Directory {
                    path: dir.to_owned(),
                    mode,
                    uid,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_file_others_could_replace_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("ca.pem");
        std::fs::write(&file, "x").unwrap();
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        };
        chmod(&file, 0o644);
        chmod(&dir, 0o755);
        check_trusted(&file).unwrap();
        chmod(&file, 0o664);
        assert_eq!(check_trusted(&file), Err(FileTrustError::Writable(0o664)));
        chmod(&file, 0o644);
        // A directory others may write: they could rename a file of theirs over it.
        chmod(&dir, 0o777);
        assert!(matches!(
            check_trusted(&file),
            Err(FileTrustError::Directory { .. })
        ));
        // Sticky (as /tmp): they may not rename over what they do not own.
        chmod(&dir, 0o1777);
        check_trusted(&file).unwrap();
        chmod(&dir, 0o755);
        // Through a symbolic link in a writable directory: that directory counts too.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let link = open.join("link.pem");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            check_trusted(&link),
            Err(FileTrustError::Directory { .. })
        ));
        assert!(check_trusted(&tmp.path().join("nope")).is_err());
    }
}
