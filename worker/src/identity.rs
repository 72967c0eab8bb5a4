//! The node's libp2p identity: kept in a file when configured (stable peer id
//! across restarts, as a Kubernetes StatefulSet needs), else new at each start.

use std::path::Path;

use anyhow::{Context, bail};
use libp2p::identity::Keypair;

/// Loads the keypair from `path` (protobuf encoding), creating the file when
/// it does not exist; an empty path yields a fresh ed25519 identity.
pub fn load_or_create(path: &str) -> anyhow::Result<Keypair> {
    if path.is_empty() {
        return Ok(Keypair::generate_ed25519());
    }
    let path = Path::new(path);
    if path.exists() {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading identity file {}", path.display()))?;
        return Keypair::from_protobuf_encoding(&bytes).with_context(|| {
            format!(
                "identity file {} does not hold a libp2p keypair",
                path.display()
            )
        });
    }
    let key = Keypair::generate_ed25519();
    let bytes = key.to_protobuf_encoding().context("encoding identity")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &bytes)
        .with_context(|| format!("writing identity file {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("writing identity file {}", path.display()))?;
    if Keypair::from_protobuf_encoding(&std::fs::read(path)?).is_err() {
        bail!("identity file {} did not read back", path.display());
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_file_is_stable() {
        let dir = std::env::temp_dir().join(format!("llama-id-test-{}", std::process::id()));
        let path = dir.join("id.key");
        let p = path.to_str().unwrap();
        let a = load_or_create(p).unwrap();
        let b = load_or_create(p).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load_or_create(p).is_err());
        let _ = std::fs::remove_dir_all(dir);
        assert_ne!(
            load_or_create("").unwrap().public().to_peer_id(),
            a.public().to_peer_id()
        );
    }
}
