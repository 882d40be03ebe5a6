//! Unit tests of the embedded store's own behaviour (the conformance suite covers the
//! [`Store`](crate::store::Store) contract).

use std::os::unix::fs::PermissionsExt as _;

use super::EmbeddedStore;

#[test]
fn the_database_file_is_its_owners_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taskcred.db");
    drop(EmbeddedStore::open(&path).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = EmbeddedStore::open(&path).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
}
