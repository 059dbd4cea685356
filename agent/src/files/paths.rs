//! Resolves caller-given paths inside the files root, refusing anything that
//! would leave it.

use std::io;
use std::path::{Component, Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path is empty: give a path relative to the agent's files root")]
    Empty,
    #[error("path `{0}` contains `..`: give a path inside the agent's files root")]
    ParentComponent(String),
    #[error("path `{0}` is outside the agent's files root")]
    OutsideRoot(String),
    #[error("path `{0}` leads outside the agent's files root through a symbolic link")]
    SymlinkEscape(String),
    #[error("path `{0}` names the files root itself, not a file")]
    IsRoot(String),
}

/// Maps `requested` to a path under `root` (which must be canonical),
/// lexically: no `..`, and absolute paths only inside the root.
pub fn resolve(root: &Path, requested: &str) -> Result<PathBuf, PathError> {
    if requested.is_empty() {
        return Err(PathError::Empty);
    }
    let path = Path::new(requested);
    let relative = if path.is_absolute() {
        path.strip_prefix(root)
            .map_err(|_| PathError::OutsideRoot(requested.to_owned()))?
    } else {
        path
    };
    let mut resolved = root.to_path_buf();
    for component in relative.components() {
        match component {
            Component::Normal(part) => resolved.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(PathError::ParentComponent(requested.to_owned())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::OutsideRoot(requested.to_owned()));
            }
        }
    }
    if resolved == root {
        return Err(PathError::IsRoot(requested.to_owned()));
    }
    Ok(resolved)
}

/// Checks that the nearest existing ancestor of `path` (or `path` itself)
/// is still inside `root` once symbolic links are followed.
pub fn check_no_escape(root: &Path, path: &Path, requested: &str) -> Result<(), PathError> {
    let mut probe = Some(path);
    while let Some(candidate) = probe {
        match candidate.canonicalize() {
            Ok(real) => {
                return if real.starts_with(root) {
                    Ok(())
                } else {
                    Err(PathError::SymlinkEscape(requested.to_owned()))
                };
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => probe = candidate.parent(),
            // A dangling link or a permission problem: refuse rather than guess.
            Err(_) => return Err(PathError::SymlinkEscape(requested.to_owned())),
        }
    }
    Err(PathError::OutsideRoot(requested.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_inside_and_refuses_escapes() {
        let root = Path::new("/srv/files");
        assert_eq!(resolve(root, "a/b.txt"), Ok(root.join("a/b.txt")));
        assert_eq!(resolve(root, "./a"), Ok(root.join("a")));
        assert_eq!(resolve(root, "/srv/files/x"), Ok(root.join("x")));
        assert!(matches!(
            resolve(root, "../etc/passwd"),
            Err(PathError::ParentComponent(_))
        ));
        assert!(matches!(
            resolve(root, "a/../../b"),
            Err(PathError::ParentComponent(_))
        ));
        assert!(matches!(
            resolve(root, "/etc/passwd"),
            Err(PathError::OutsideRoot(_))
        ));
        assert!(matches!(
            resolve(root, "/srv/filesX/y"),
            Err(PathError::OutsideRoot(_))
        ));
        assert_eq!(resolve(root, ""), Err(PathError::Empty));
        assert!(matches!(resolve(root, "."), Err(PathError::IsRoot(_))));
    }

    #[test]
    fn refuses_symlinks_that_point_outside() {
        let outside = tempfile::tempdir().expect("tempdir");
        let root_dir = tempfile::tempdir().expect("tempdir");
        let root = root_dir.path().canonicalize().expect("canonical");
        std::os::unix::fs::symlink(outside.path(), root.join("link")).expect("symlink");
        std::fs::create_dir(root.join("real")).expect("mkdir");
        let escaped = resolve(&root, "link/secret").expect("lexically fine");
        assert!(matches!(
            check_no_escape(&root, &escaped, "link/secret"),
            Err(PathError::SymlinkEscape(_))
        ));
        let inside = resolve(&root, "real/new/file").expect("lexically fine");
        assert_eq!(check_no_escape(&root, &inside, "real/new/file"), Ok(()));
    }
}
