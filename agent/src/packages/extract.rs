//! Unpacks .tar.gz and .zip archives, refusing entries that would land
//! outside the destination and stopping past a size limit.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use super::PackageError;

/// Extracts `package` into a temporary directory beside `destination`, then
/// renames it into place. Returns how many files were written.
pub fn extract_atomically(
    package: &Path,
    destination: &Path,
    limit: u64,
    sha256: &str,
) -> Result<u64, PackageError> {
    let parent = destination.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| PackageError::Io {
        action: "creating",
        path: parent.to_owned(),
        source,
    })?;
    let temp = parent.join(format!(".extracting-{}", uuid::Uuid::new_v4().simple()));
    let result = extract_into(package, &temp, limit, sha256).and_then(|files| {
        std::fs::rename(&temp, destination)
            .map(|()| files)
            .map_err(|source| PackageError::Io {
                action: "renaming into",
                path: destination.to_owned(),
                source,
            })
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result
}

fn unsafe_package(sha256: &str, reason: impl Into<String>) -> PackageError {
    PackageError::Unsafe {
        sha256: sha256.to_owned(),
        reason: reason.into(),
    }
}

/// A relative path with only normal components, or `None`.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

fn extract_into(
    package: &Path,
    dest: &Path,
    limit: u64,
    sha256: &str,
) -> Result<u64, PackageError> {
    let io_err = |source: io::Error| PackageError::Io {
        action: "extracting",
        path: package.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    File::open(package)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(io_err)?;
    std::fs::create_dir_all(dest).map_err(io_err)?;
    match magic {
        [0x1f, 0x8b, ..] => extract_tar_gz(package, dest, limit, sha256),
        [b'P', b'K', 3, 4] => extract_zip(package, dest, limit, sha256),
        _ => Err(PackageError::UnknownFormat {
            sha256: sha256.to_owned(),
        }),
    }
}

fn extract_tar_gz(
    package: &Path,
    dest: &Path,
    limit: u64,
    sha256: &str,
) -> Result<u64, PackageError> {
    let file = File::open(package).map_err(|e| unsafe_package(sha256, e.to_string()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut written = 0u64;
    let mut files = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| unsafe_package(sha256, e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| unsafe_package(sha256, e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| unsafe_package(sha256, e.to_string()))?
            .into_owned();
        let Some(relative) = safe_relative(&path) else {
            return Err(unsafe_package(
                sha256,
                format!("entry `{}` leaves the destination", path.display()),
            ));
        };
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| unsafe_package(sha256, e.to_string()))?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            // A link may only point at something inside the package.
            let base = relative.parent().unwrap_or(Path::new(""));
            let resolved = if kind.is_hard_link() {
                target.clone()
            } else {
                base.join(&target)
            };
            if target.is_absolute() || !stays_inside(&resolved) {
                return Err(unsafe_package(
                    sha256,
                    format!("link `{}` points outside the package", path.display()),
                ));
            }
        }
        written = written.saturating_add(entry.header().size().unwrap_or(0));
        if written > limit {
            return Err(unsafe_package(
                sha256,
                format!("it expands beyond the {limit}-byte limit"),
            ));
        }
        // `unpack_in` re-checks that nothing is written through a link
        // that leaves `dest`.
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|e| unsafe_package(sha256, e.to_string()))?;
        if !unpacked {
            return Err(unsafe_package(
                sha256,
                format!("entry `{}` leaves the destination", path.display()),
            ));
        }
        if kind.is_file() {
            files += 1;
        }
    }
    Ok(files)
}

/// Whether a relative path, with `..` resolved lexically, stays inside.
fn stays_inside(path: &Path) -> bool {
    let mut depth = 0i64;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

fn extract_zip(package: &Path, dest: &Path, limit: u64, sha256: &str) -> Result<u64, PackageError> {
    let file = File::open(package).map_err(|e| unsafe_package(sha256, e.to_string()))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| unsafe_package(sha256, e.to_string()))?;
    let mut written = 0u64;
    let mut files = 0u64;
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|e| unsafe_package(sha256, e.to_string()))?;
        let name = entry.name().map(|n| n.into_owned()).unwrap_or_default();
        let Some(relative) = entry.enclosed_name().and_then(|p| safe_relative(&p)) else {
            return Err(unsafe_package(
                sha256,
                format!("entry `{name}` leaves the destination"),
            ));
        };
        let target = dest.join(&relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| unsafe_package(sha256, e.to_string()))?;
            continue;
        }
        if entry.is_symlink() {
            return Err(unsafe_package(
                sha256,
                format!("zip entry `{name}` is a symbolic link"),
            ));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| unsafe_package(sha256, e.to_string()))?;
        }
        let mut out = File::create(&target).map_err(|e| unsafe_package(sha256, e.to_string()))?;
        // Count what is really inflated, not what the header claims.
        let remaining = limit.saturating_sub(written);
        let copied = io::copy(
            &mut (&mut entry).take(remaining.saturating_add(1)),
            &mut out,
        )
        .map_err(|e| unsafe_package(sha256, e.to_string()))?;
        written = written.saturating_add(copied);
        if written > limit {
            return Err(unsafe_package(
                sha256,
                format!("it expands beyond the {limit}-byte limit"),
            ));
        }
        out.flush()
            .map_err(|e| unsafe_package(sha256, e.to_string()))?;
        #[cfg(unix)]
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ =
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o777));
        }
        files += 1;
    }
    Ok(files)
}
