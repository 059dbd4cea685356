//! The package cache: packages stored once by SHA-256, extracted into
//! application directories, and evicted by age and total size.
//!
//! Architecture Invariant: a package enters the cache only through the same
//! verified, atomic path as any upload, and an application directory
//! appears only once its extraction has finished (it is extracted beside
//! its final place and renamed).

mod extract;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;

use crate::files::{FileError, FileSettings, Files, FreeSpace, Statvfs, UploadHeader};

/// Limits for the package cache.
#[derive(Debug, Clone)]
pub struct PackageSettings {
    pub cache_dir: PathBuf,
    pub apps_dir: PathBuf,
    /// The cache is trimmed, least recently used first, to this size.
    pub max_cache_bytes: u64,
    /// Cached packages unused for this long are deleted.
    pub max_age: Duration,
    /// The largest package accepted.
    pub max_package_bytes: u64,
    /// Extraction stops past this many bytes (a decompression bomb guard).
    pub max_extracted_bytes: u64,
    /// Uploads that would leave less free space than this are refused.
    pub min_free_bytes: u64,
    /// Answers the free-space check for package uploads.
    pub free_space: Arc<dyn FreeSpace>,
}

impl PackageSettings {
    pub fn new(cache_dir: PathBuf, apps_dir: PathBuf) -> Self {
        Self {
            cache_dir,
            apps_dir,
            max_cache_bytes: 10 * 1024 * 1024 * 1024,
            max_age: Duration::from_secs(30 * 24 * 60 * 60),
            max_package_bytes: 16 * 1024 * 1024 * 1024,
            max_extracted_bytes: 64 * 1024 * 1024 * 1024,
            min_free_bytes: 256 * 1024 * 1024,
            free_space: Arc::new(Statvfs),
        }
    }
}

/// Why a package operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("`{0}` is not a SHA-256: give 64 hex characters")]
    BadDigest(String),
    #[error("application name `{0}` is not valid: use letters, digits, `-`, `_` or `.`")]
    BadApplication(String),
    #[error("no package {0} in the cache; upload it first")]
    NotCached(String),
    #[error("package {sha256} is neither a .tar.gz nor a .zip")]
    UnknownFormat { sha256: String },
    #[error("package {sha256} is unsafe or corrupt: {reason}")]
    Unsafe { sha256: String, reason: String },
    #[error(transparent)]
    Transfer(#[from] FileError),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// A package's place in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPackage {
    pub sha256: String,
    pub present: bool,
    pub size: u64,
}

/// An extracted application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub path: PathBuf,
    pub files: u64,
    pub already: bool,
}

/// The cache and the application directories.
#[derive(Debug, Clone)]
pub struct Packages {
    settings: PackageSettings,
    store: Files,
}

fn digest(text: &str) -> Result<String, PackageError> {
    let lower = text.trim().to_ascii_lowercase();
    if lower.len() == 64 && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(lower)
    } else {
        Err(PackageError::BadDigest(text.to_owned()))
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> PackageError + 'a {
    move |source| PackageError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

impl Packages {
    pub fn new(settings: PackageSettings) -> io::Result<Self> {
        std::fs::create_dir_all(&settings.apps_dir)?;
        let mut store = FileSettings::new(settings.cache_dir.clone());
        store.max_upload_bytes = settings.max_package_bytes;
        store.min_free_bytes = settings.min_free_bytes;
        // Packages are always stored, even on an agent that discards file
        // uploads: extraction reads them back.
        store.free_space = settings.free_space.clone();
        Ok(Self {
            store: Files::new(store)?,
            settings,
        })
    }

    fn cached_path(&self, sha256: &str) -> PathBuf {
        self.store.root().join(format!("{sha256}.pkg"))
    }

    /// Whether the cache holds `sha256`.
    pub async fn status(&self, sha256: &str) -> Result<CachedPackage, PackageError> {
        let sha256 = digest(sha256)?;
        let path = self.cached_path(&sha256);
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(CachedPackage {
                sha256,
                present: true,
                size: meta.len(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(CachedPackage {
                sha256,
                present: false,
                size: 0,
            }),
            Err(e) => Err(io_error("reading", &path)(e)),
        }
    }

    /// Stores a package, verified against its digest, then trims the cache.
    pub async fn upload<S>(
        &self,
        sha256: &str,
        size: u64,
        chunks: S,
    ) -> Result<CachedPackage, PackageError>
    where
        S: Stream<Item = Result<Vec<u8>, FileError>> + Unpin,
    {
        let sha256 = digest(sha256)?;
        let header = UploadHeader {
            path: format!("{sha256}.pkg"),
            size,
            sha256: sha256.clone(),
        };
        let stored = self.store.upload(header, chunks).await?;
        tracing::info!(%sha256, bytes = stored.size, "package cached");
        let evicted = self.evict(Some(&sha256)).await;
        if evicted > 0 {
            tracing::info!(evicted, "evicted old packages from the cache");
        }
        Ok(CachedPackage {
            sha256,
            present: true,
            size: stored.size,
        })
    }

    /// Extracts a cached package into `<apps>/<application>/<digest prefix>`.
    pub async fn extract(
        &self,
        sha256: &str,
        application: &str,
    ) -> Result<Extracted, PackageError> {
        let sha256 = digest(sha256)?;
        let valid = !application.is_empty()
            && application.len() <= 128
            && !application.starts_with('.')
            && application
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(PackageError::BadApplication(application.to_owned()));
        }
        let package = self.cached_path(&sha256);
        if !package.is_file() {
            return Err(PackageError::NotCached(sha256));
        }
        // Using a package counts as using it, for eviction.
        touch(&package);
        let destination = self.settings.apps_dir.join(application).join(&sha256[..16]);
        if destination.is_dir() {
            let files = count_files(&destination);
            return Ok(Extracted {
                path: destination,
                files,
                already: true,
            });
        }
        let limit = self.settings.max_extracted_bytes;
        let dest = destination.clone();
        let digest = sha256.clone();
        tokio::task::spawn_blocking(move || {
            extract::extract_atomically(&package, &dest, limit, &digest)
        })
        .await
        .map_err(|e| io_error("extracting into", &destination)(io::Error::other(e)))?
        .map(|files| Extracted {
            path: destination,
            files,
            already: false,
        })
    }

    /// Deletes packages unused for longer than the maximum age, then the
    /// least recently used ones until the cache fits its size. `keep` is
    /// never deleted. Returns how many were deleted.
    pub async fn evict(&self, keep: Option<&str>) -> usize {
        let root = self.store.root().to_owned();
        let settings = self.settings.clone();
        let keep = keep.map(|k| format!("{k}.pkg"));
        tokio::task::spawn_blocking(move || evict_blocking(&root, &settings, keep.as_deref()))
            .await
            .unwrap_or(0)
    }
}

fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

fn count_files(dir: &Path) -> u64 {
    let mut count = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(_) => count += 1,
                Err(_) => {}
            }
        }
    }
    count
}

fn evict_blocking(root: &Path, settings: &PackageSettings, keep: Option<&str>) -> usize {
    let now = SystemTime::now();
    let mut entries: Vec<(SystemTime, u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pkg"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    entries.sort_by_key(|(used, _, _)| *used);
    let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
    let mut deleted = 0;
    for (used, size, path) in entries {
        let kept = keep.is_some_and(|k| path.file_name().is_some_and(|n| n == k));
        let too_old = now.duration_since(used).unwrap_or_default() > settings.max_age;
        if !kept
            && (too_old || total > settings.max_cache_bytes)
            && std::fs::remove_file(&path).is_ok()
        {
            total = total.saturating_sub(size);
            deleted += 1;
        }
    }
    deleted
}

#[cfg(test)]
mod tests;
