//! The machine's own limits, measured the way the Tentacle rows use them:
//! the disk's fsynced write rate, and a raw rustls copy over loopback with
//! the same pinned-certificate TLS and no gRPC.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tentacle_proto::tls::{IdentityCell, client_config, server_config};
use tentacle_proto::{Identity, TrustStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes `bytes` to a new file in `dir` in 1 MiB writes, then fsyncs it,
/// as `dd bs=1M conv=fsync` does; returns bytes per second.
pub fn disk_fsync(dir: &Path, bytes: u64) -> std::io::Result<f64> {
    let path = dir.join("disk-fsync.bin");
    let block = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut file = std::fs::File::create(&path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    let elapsed = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(bytes as f64 / elapsed)
}

/// Why the rustls copy could not run.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Identity(#[from] tentacle_proto::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] tentacle_proto::tls::TlsConfigError),
    #[error("the receiver read {got} bytes of {sent}")]
    Short { got: u64, sent: u64 },
}

/// Copies `bytes` from a client to a server over loopback TLS with pinned
/// certificates on both sides; returns bytes per second, from the first
/// byte sent to the last byte read.
pub async fn rustls_copy(bytes: u64) -> Result<f64, CopyError> {
    let server = Identity::generate("bench-server")?;
    let client = Identity::generate("bench-client")?;
    let server_thumbprint = server.thumbprint();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(
        IdentityCell::new(server)?,
        TrustStore::new([client.thumbprint()]),
    )?);
    let connector = tokio_rustls::TlsConnector::from(client_config(
        &client,
        TrustStore::new([server_thumbprint]),
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buffer = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = tls.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok::<_, std::io::Error>((got, Instant::now()))
    });
    let tcp = tokio::net::TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("tentacle")
        .map_err(std::io::Error::other)?;
    let mut tls = connector.connect(name, tcp).await?;
    let block = Arc::new(vec![0xa5u8; 256 << 10]);
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        tls.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    tls.shutdown().await?;
    let (got, finished) = receiver.await.map_err(std::io::Error::other)??;
    if got != bytes {
        return Err(CopyError::Short { got, sent: bytes });
    }
    Ok(bytes as f64 / finished.duration_since(started).as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_row_writes_and_removes_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rate = disk_fsync(dir.path(), 3 << 20).expect("write");
        assert!(rate > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[tokio::test]
    async fn the_rustls_copy_delivers_every_byte() {
        let rate = rustls_copy((2 << 20) + 17).await.expect("copy");
        assert!(rate > 0.0);
    }
}
