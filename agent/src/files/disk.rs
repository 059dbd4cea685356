//! Free disk space, checked before an upload writes anything.

use std::io;
use std::path::Path;

/// Bytes available to this (unprivileged) process on the file system holding
/// `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let stats = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (
        u64::from(stats.blocks_available()),
        u64::from(stats.fragment_size()),
    );
    Ok(blocks.saturating_mul(size))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_some_free_space_for_the_temp_dir() {
        let free = super::available_bytes(&std::env::temp_dir()).expect("statvfs");
        assert!(free > 0);
    }
}
