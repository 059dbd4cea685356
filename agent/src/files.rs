//! File transfer under the agent's files root.
//!
//! Architecture Invariant: an upload is written to a temporary file beside
//! its destination, checked for size and SHA-256, fsynced and renamed into
//! place. A broken, short, long or corrupt upload never leaves anything at
//! the destination, and memory use does not grow with the file's size.

mod disk;
pub mod paths;

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;

pub use disk::{FakeFreeSpace, FreeSpace, Statvfs, available_bytes};
pub use paths::PathError;

/// Where a verified upload's bytes go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UploadSink {
    /// Into place at the destination: what a real agent does.
    #[default]
    Store,
    /// Nowhere: the size, digest, path and free-space checks all run, then
    /// the bytes are dropped. For the fleet simulator's virtual agents, so
    /// that a load test measures the transport rather than the disk.
    Discard,
}

/// Limits for file transfer.
#[derive(Debug, Clone)]
pub struct FileSettings {
    /// Every path resolves inside this directory.
    pub root: PathBuf,
    /// Larger uploads are refused before anything is written.
    pub max_upload_bytes: u64,
    /// Uploads that would leave less free space than this are refused.
    pub min_free_bytes: u64,
    /// Size of each download chunk.
    pub chunk_bytes: usize,
    /// What happens to an upload once it is verified.
    pub upload_sink: UploadSink,
    /// Answers the free-space check.
    pub free_space: Arc<dyn FreeSpace>,
}

impl FileSettings {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            max_upload_bytes: 64 * 1024 * 1024 * 1024,
            min_free_bytes: 256 * 1024 * 1024,
            chunk_bytes: 256 * 1024,
            upload_sink: UploadSink::Store,
            free_space: Arc::new(Statvfs),
        }
    }
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "upload of {size} bytes exceeds the agent's limit of {limit} bytes (files.max_upload_bytes)"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error(
        "not enough disk space for {size} bytes at {path}: {available} bytes free and {reserve} must stay free"
    )]
    DiskFull {
        path: PathBuf,
        size: u64,
        available: u64,
        reserve: u64,
    },
    #[error("no file at `{0}`")]
    NotFound(String),
    #[error("offset {offset} is beyond the end of `{path}` ({size} bytes)")]
    OffsetBeyondEnd {
        path: String,
        offset: u64,
        size: u64,
    },
    #[error("upload ended after {received} of {expected} bytes; nothing was written")]
    SizeMismatch { received: u64, expected: u64 },
    #[error("the uploaded bytes hash to {actual}, not {expected}; nothing was written")]
    DigestMismatch { expected: String, actual: String },
    #[error("{action} `{}` failed: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What an upload declares before its bytes.
#[derive(Debug, Clone)]
pub struct UploadHeader {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// A file that is in place, or about to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// A download that has been opened: its header, then its chunks.
#[derive(Debug)]
pub struct Download {
    pub info: FileInfo,
    pub offset: u64,
    pub chunks: mpsc::Receiver<Result<Vec<u8>, FileError>>,
}

/// The files root and the transfers in and out of it.
#[derive(Debug, Clone)]
pub struct Files {
    settings: FileSettings,
    root: PathBuf,
}

impl Files {
    /// Creates the root if needed.
    pub fn new(settings: FileSettings) -> io::Result<Self> {
        std::fs::create_dir_all(&settings.root)?;
        let root = settings.root.canonicalize()?;
        Ok(Self { settings, root })
    }

    /// The probe that says how much may still be written.
    pub fn free_space(&self) -> &Arc<dyn FreeSpace> {
        &self.settings.free_space
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores the chunks at the header's path once they match its size and
    /// digest.
    pub async fn upload<S>(&self, header: UploadHeader, chunks: S) -> Result<FileInfo, FileError>
    where
        S: Stream<Item = Result<Vec<u8>, FileError>> + Unpin,
    {
        let expected_digest = parse_digest(&header.sha256)?;
        if header.size > self.settings.max_upload_bytes {
            return Err(FileError::TooLarge {
                size: header.size,
                limit: self.settings.max_upload_bytes,
            });
        }
        let destination = paths::resolve(&self.root, &header.path)?;
        paths::check_no_escape(&self.root, &destination, &header.path)?;
        let parent = destination
            .parent()
            .ok_or_else(|| PathError::IsRoot(header.path.clone()))?
            .to_owned();
        if self.settings.upload_sink == UploadSink::Discard {
            // Nothing is created, so the root is the nearest directory that
            // is sure to exist; the check still refuses what a full disk
            // would.
            self.check_free_space(&self.root, header.size)?;
            let actual = verify(&header, expected_digest, chunks, None).await?;
            return Ok(FileInfo {
                path: destination,
                size: header.size,
                sha256: actual,
            });
        }
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(io_error("creating directory", &parent))?;
        // Check again now that the directories exist: one of them may be a
        // link created in between.
        paths::check_no_escape(&self.root, &parent, &header.path)?;
        if destination.is_dir() {
            return Err(FileError::BadRequest(format!(
                "`{}` is a directory; give a file path",
                header.path
            )));
        }
        self.check_free_space(&parent, header.size)?;

        let temp = TempFile::new(&parent);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(temp.path())
            .await
            .map_err(io_error("creating", temp.path()))?;
        let actual = verify(
            &header,
            expected_digest,
            chunks,
            Some((&mut file, temp.path())),
        )
        .await?;
        file.sync_all()
            .await
            .map_err(io_error("syncing", temp.path()))?;
        drop(file);
        temp.persist(&destination).await?;
        tracing::info!(path = %destination.display(), bytes = header.size, "file stored");
        Ok(FileInfo {
            path: destination,
            size: header.size,
            sha256: actual,
        })
    }

    /// Refuses an upload of `size` bytes into `dir` that would leave less
    /// than the reserve free.
    fn check_free_space(&self, dir: &Path, size: u64) -> Result<(), FileError> {
        let available = self
            .settings
            .free_space
            .available_bytes(dir)
            .map_err(io_error("checking free space on", dir))?;
        if available < size.saturating_add(self.settings.min_free_bytes) {
            return Err(FileError::DiskFull {
                path: dir.to_owned(),
                size,
                available,
                reserve: self.settings.min_free_bytes,
            });
        }
        Ok(())
    }

    /// Opens `path` for download from `offset`. The whole file's digest is
    /// computed first so a resumed download can be verified end to end.
    pub async fn download(&self, path: &str, offset: u64) -> Result<Download, FileError> {
        let resolved = paths::resolve(&self.root, path)?;
        // Refuse an escape before saying whether anything exists there.
        paths::check_no_escape(&self.root, &resolved, path)?;
        let real = match resolved.canonicalize() {
            Ok(real) => real,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FileError::NotFound(path.to_owned()));
            }
            Err(e) => return Err(io_error("opening", &resolved)(e)),
        };
        if !real.starts_with(&self.root) {
            return Err(PathError::SymlinkEscape(path.to_owned()).into());
        }
        if !real.is_file() {
            return Err(FileError::BadRequest(format!(
                "`{path}` is not a regular file"
            )));
        }
        let mut file = tokio::fs::File::open(&real)
            .await
            .map_err(io_error("opening", &real))?;
        let size = file
            .metadata()
            .await
            .map_err(io_error("reading", &real))?
            .len();
        if offset > size {
            return Err(FileError::OffsetBeyondEnd {
                path: path.to_owned(),
                offset,
                size,
            });
        }
        // Hash through the same open file that is sent, so a file replaced
        // on disk in between cannot make the digest disagree with the bytes.
        let std_file = file
            .try_clone()
            .await
            .map_err(io_error("reading", &real))?
            .into_std()
            .await;
        let sha256 = hash_open_file(std_file, &real).await?;
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(io_error("reading", &real))?;
        // Two chunks in flight at most, so memory stays flat.
        let (tx, rx) = mpsc::channel(2);
        let chunk_bytes = self.settings.chunk_bytes.max(1);
        let source = real.clone();
        tokio::spawn(async move {
            let mut remaining = size - offset;
            while remaining > 0 {
                let want = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(chunk_bytes);
                let mut chunk = vec![0u8; want];
                let result = file
                    .read_exact(&mut chunk)
                    .await
                    .map(|_| chunk)
                    .map_err(io_error("reading", &source));
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
                remaining -= want as u64;
            }
        });
        Ok(Download {
            info: FileInfo {
                path: real,
                size,
                sha256,
            },
            offset,
            chunks: rx,
        })
    }
}

fn parse_digest(text: &str) -> Result<String, FileError> {
    let lower = text.to_ascii_lowercase();
    if lower.len() == 64 && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(lower)
    } else {
        Err(FileError::BadRequest(format!(
            "sha256 `{text}` is not valid: give the file's SHA-256 as 64 hex characters"
        )))
    }
}

async fn hash_open_file(mut file: std::fs::File, path: &Path) -> Result<String, FileError> {
    tokio::task::spawn_blocking(move || {
        use std::io::Seek;
        file.seek(SeekFrom::Start(0))?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher)?;
        Ok::<_, io::Error>(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(io::Error::other)
    .and_then(|r| r)
    .map_err(io_error("hashing", path))
}

/// A partial upload; removed unless it is persisted.
#[derive(Debug)]
struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    /// A fixed-length name, so a destination name near the file system's
    /// limit still fits.
    fn new(dir: &Path) -> Self {
        Self {
            path: Some(dir.join(format!(
                ".tentacle-upload-{}.partial",
                uuid::Uuid::new_v4().simple()
            ))),
        }
    }

    fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    async fn persist(mut self, destination: &Path) -> Result<(), FileError> {
        let Some(temp) = self.path.take() else {
            return Ok(());
        };
        if let Err(source) = tokio::fs::rename(&temp, destination).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(FileError::Io {
                action: "renaming into",
                path: destination.to_owned(),
                source,
            });
        }
        // The rename is durable only once the directory is synced.
        if let Some(parent) = destination.parent()
            && let Ok(dir) = tokio::fs::File::open(parent).await
        {
            let _ = dir.sync_all().await;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Hashes and counts `chunks`, writing each to `sink` if there is one, and
/// checks them against the header's size and digest. Returns the digest.
async fn verify<S>(
    header: &UploadHeader,
    expected_digest: String,
    mut chunks: S,
    mut sink: Option<(&mut tokio::fs::File, &Path)>,
) -> Result<String, FileError>
where
    S: Stream<Item = Result<Vec<u8>, FileError>> + Unpin,
{
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        received += chunk.len() as u64;
        if received > header.size {
            return Err(FileError::BadRequest(format!(
                "upload sent more than the {} bytes its header declared; nothing was written",
                header.size
            )));
        }
        hasher.update(&chunk);
        if let Some((file, path)) = sink.as_mut() {
            file.write_all(&chunk)
                .await
                .map_err(io_error("writing", path))?;
        }
    }
    if received != header.size {
        return Err(FileError::SizeMismatch {
            received,
            expected: header.size,
        });
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected_digest {
        return Err(FileError::DigestMismatch {
            expected: expected_digest,
            actual,
        });
    }
    Ok(actual)
}

#[cfg(test)]
mod tests;
