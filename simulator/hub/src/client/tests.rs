use std::sync::{Arc, Mutex};

use tentacle_proto::v1::file_service_server::{FileService, FileServiceServer};
use tonic::service::Routes;
use tonic::{Request, Response, Streaming};

use super::*;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What the fake agent ends a download with.
#[derive(Debug, Clone)]
enum Trailer {
    True,
    Wrong(String),
    Missing,
}

/// A file service that answers downloads from `body`, ended as `trailer`
/// says, and records every upload message.
#[derive(Debug, Clone)]
struct FakeFiles {
    body: Vec<u8>,
    trailer: Trailer,
    uploads: Arc<Mutex<Vec<pb::UploadFileRequest>>>,
    /// The digest an upload's reply names instead of the received bytes'.
    reply_sha256: Option<String>,
}

impl FakeFiles {
    fn new(body: &[u8]) -> Self {
        Self {
            body: body.to_vec(),
            trailer: Trailer::True,
            uploads: Arc::default(),
            reply_sha256: None,
        }
    }
}

type Parts = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::DownloadFileResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl FileService for FakeFiles {
    async fn upload_file(
        &self,
        request: Request<Streaming<pb::UploadFileRequest>>,
    ) -> Result<Response<pb::UploadFileResponse>, Status> {
        use pb::upload_file_request::Part;
        let mut stream = request.into_inner();
        let mut received = Vec::new();
        while let Some(message) = stream.message().await? {
            if let Some(Part::Chunk(bytes)) = &message.part {
                received.extend_from_slice(bytes);
            }
            self.uploads.lock().expect("uploads").push(message);
        }
        Ok(Response::new(pb::UploadFileResponse {
            path: "/files/x".into(),
            size: received.len() as u64,
            sha256: self.reply_sha256.clone().unwrap_or_else(|| sha(&received)),
        }))
    }

    type DownloadFileStream = Parts;

    async fn download_file(
        &self,
        request: Request<pb::DownloadFileRequest>,
    ) -> Result<Response<Parts>, Status> {
        use pb::download_file_response::Part;
        let offset = request.into_inner().offset;
        let start = usize::try_from(offset).expect("offset");
        let mut parts = vec![Part::Header(pb::DownloadHeader {
            path: "/files/x".into(),
            size: self.body.len() as u64,
            sha256: String::new(),
            offset,
        })];
        parts.extend(
            self.body[start..]
                .chunks(5)
                .map(|c| Part::Chunk(c.to_vec())),
        );
        match &self.trailer {
            Trailer::True => parts.push(Part::Trailer(pb::DownloadTrailer {
                sha256: sha(&self.body),
            })),
            Trailer::Wrong(sha256) => parts.push(Part::Trailer(pb::DownloadTrailer {
                sha256: sha256.clone(),
            })),
            Trailer::Missing => {}
        }
        let messages = parts
            .into_iter()
            .map(|part| Ok(pb::DownloadFileResponse { part: Some(part) }));
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }
}

async fn client(files: FakeFiles) -> AgentClient {
    let channel = crate::testing::connect(
        Routes::new(FileServiceServer::new(files)),
        crate::testing::thumbprint("client-tests"),
    )
    .await;
    AgentClient::new(channel)
}

const BODY: &[u8] = b"twenty-nine bytes of content.";

#[tokio::test]
async fn an_upload_sends_an_empty_header_digest_and_the_digest_last() {
    let fake = FakeFiles::new(b"");
    let uploads = fake.uploads.clone();
    let client = client(fake).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("up.bin");
    std::fs::write(&local, BODY).expect("write");

    let reply = client.upload(&local, "x", 4).await.expect("upload");
    assert_eq!((reply.size, reply.sha256), (BODY.len() as u64, sha(BODY)));

    use pb::upload_file_request::Part;
    let messages = uploads.lock().expect("uploads").clone();
    let Some(Part::Header(header)) = &messages[0].part else {
        panic!("the first message is not a header: {messages:?}");
    };
    assert_eq!(
        (header.size, header.sha256.as_str()),
        (BODY.len() as u64, "")
    );
    let chunks: Vec<u8> = messages[1..messages.len() - 1]
        .iter()
        .flat_map(|m| match &m.part {
            Some(Part::Chunk(bytes)) => bytes.clone(),
            other => panic!("a chunk was expected, not {other:?}"),
        })
        .collect();
    assert_eq!(chunks, BODY);
    assert_eq!(
        messages.last().and_then(|m| m.part.clone()),
        Some(Part::Trailer(pb::UploadTrailer { sha256: sha(BODY) }))
    );
}

#[tokio::test]
async fn an_upload_reply_naming_another_digest_is_refused() {
    let mut fake = FakeFiles::new(b"");
    fake.reply_sha256 = Some(sha(b"not what was sent"));
    let client = client(fake).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("up.bin");
    std::fs::write(&local, BODY).expect("write");
    let err = client.upload(&local, "x", 4).await.expect_err("mismatch");
    assert!(
        matches!(&err, ClientError::UploadIntegrity { sent, .. } if *sent == sha(BODY)),
        "{err}"
    );
}

#[tokio::test]
async fn a_download_is_verified_against_its_trailer() {
    let client = client(FakeFiles::new(BODY)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("down.bin");
    let header = client.download("x", &local, true).await.expect("download");
    assert_eq!((header.offset, header.sha256), (0, sha(BODY)));
    assert_eq!(std::fs::read(&local).expect("read"), BODY);
    assert!(!partial_path(&local).exists());
}

#[tokio::test]
async fn a_resumed_download_hashes_the_partial_prefix_too() {
    let client = client(FakeFiles::new(BODY)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("down.bin");
    std::fs::write(partial_path(&local), &BODY[..11]).expect("partial");
    let header = client.download("x", &local, true).await.expect("resume");
    assert_eq!((header.offset, header.sha256), (11, sha(BODY)));
    assert_eq!(std::fs::read(&local).expect("read"), BODY);

    // A prefix that differs from the agent's file fails the whole digest.
    let corrupt = dir.path().join("corrupt.bin");
    std::fs::write(partial_path(&corrupt), b"XXXXXXXXXXX").expect("partial");
    let err = client
        .download("x", &corrupt, true)
        .await
        .expect_err("corrupt prefix");
    assert!(matches!(err, ClientError::Integrity { .. }), "{err}");
    assert!(!corrupt.exists() && !partial_path(&corrupt).exists());
}

#[tokio::test]
async fn a_tampered_trailer_is_an_integrity_error_and_removes_the_partial() {
    let mut fake = FakeFiles::new(BODY);
    fake.trailer = Trailer::Wrong(sha(b"something else"));
    let client = client(fake).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("down.bin");
    let err = client
        .download("x", &local, false)
        .await
        .expect_err("tampered");
    match err {
        ClientError::Integrity { expected, actual } => {
            assert_eq!((expected, actual), (sha(b"something else"), sha(BODY)));
        }
        other => panic!("not an integrity error: {other}"),
    }
    assert!(!local.exists() && !partial_path(&local).exists());
}

#[tokio::test]
async fn a_download_without_a_trailer_is_a_protocol_error() {
    let mut fake = FakeFiles::new(BODY);
    fake.trailer = Trailer::Missing;
    let client = client(fake).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("down.bin");
    let err = client
        .download("x", &local, false)
        .await
        .expect_err("no trailer");
    assert!(
        matches!(err, ClientError::Protocol(m) if m.contains("trailer")),
        "{err}"
    );
    assert!(
        !local.exists(),
        "an unverified download is not put in place"
    );
}
