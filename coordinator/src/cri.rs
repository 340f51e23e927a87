//! A CRI client over a unix socket.
//!
//! CRI servers (containerd, CRI-O) listen on a unix socket, not TCP. tonic's `Endpoint` wants a
//! URI, so we give it a placeholder one and a custom connector that ignores the URI and dials the
//! socket instead. The endpoint is given the way crictl and kubelet take it:
//! `unix:///run/containerd/containerd.sock` or a plain path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Largest CRI message we send or accept. Kubelet uses 16 MiB as well; `ListContainers` on a busy
/// node and `ContainerStats` answers can exceed tonic's 4 MiB default.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// How long to wait for the socket to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure to reach the CRI endpoint.
#[derive(Debug, thiserror::Error)]
pub enum CriConnectError {
    /// The endpoint string is not `unix:///path` or a plain path.
    #[error("unsupported CRI endpoint {0:?}: expected unix:///path/to/socket or a socket path")]
    UnsupportedEndpoint(String),
    /// The socket did not accept the connection.
    #[error("cannot connect to the CRI endpoint {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What tonic reported.
        source: tonic::transport::Error,
    },
}

/// Both CRI services over one connection.
#[derive(Debug, Clone)]
pub struct CriClients {
    /// `runtime.v1.RuntimeService`: pods, containers, exec, stats.
    pub runtime: RuntimeServiceClient<Channel>,
    /// `runtime.v1.ImageService`: images.
    pub image: ImageServiceClient<Channel>,
}

/// Turns `unix:///path` or `/path` into the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CriConnectError> {
    let path = match endpoint.strip_prefix("unix://") {
        Some(rest) => rest,
        None if endpoint.contains("://") => {
            return Err(CriConnectError::UnsupportedEndpoint(endpoint.to_owned()))
        }
        None => endpoint,
    };
    if path.is_empty() {
        return Err(CriConnectError::UnsupportedEndpoint(endpoint.to_owned()));
    }
    Ok(PathBuf::from(path))
}

/// Opens a channel to the CRI server listening on `endpoint`.
///
/// The connection is made once here (so a wrong path fails now, not on the first call); tonic
/// reconnects through the same connector if the server restarts.
pub async fn connect_channel(endpoint: &str) -> Result<Channel, CriConnectError> {
    let path = socket_path(endpoint)?;
    channel_to(&path).await
}

async fn channel_to(path: &Path) -> Result<Channel, CriConnectError> {
    // The authority is never used to route anything: the connector below ignores the URI.
    let dial_path = path.to_path_buf();
    Endpoint::from_static("http://cri.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let dial_path = dial_path.clone();
            async move {
                let stream = UnixStream::connect(dial_path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| CriConnectError::Connect {
            path: path.to_path_buf(),
            source,
        })
}

/// Connects to `endpoint` and returns the runtime and image clients, both with
/// [`MAX_MESSAGE_SIZE`] limits.
pub async fn connect(endpoint: &str) -> Result<CriClients, CriConnectError> {
    let channel = connect_channel(endpoint).await?;
    Ok(clients(channel))
}

/// Wraps an open channel into the two CRI clients with [`MAX_MESSAGE_SIZE`] limits.
pub fn clients(channel: Channel) -> CriClients {
    let runtime = RuntimeServiceClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let image = ImageServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    CriClients { runtime, image }
}

/// A CRI image reference, as ImageStatus and PullImage take it.
pub fn image_spec(image: &str) -> k8s_cri::v1::ImageSpec {
    k8s_cri::v1::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// CRI's ImageStatus of `image` (a name, a digest reference or an image id); `None` when the
/// node does not have it.
pub async fn image_status(
    clients: &CriClients,
    image: &str,
) -> crate::error::Result<Option<k8s_cri::v1::Image>> {
    Ok(clients
        .image
        .clone()
        .image_status(k8s_cri::v1::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        })
        .await
        .map_err(crate::error::Error::cri(format!("ImageStatus {image}")))?
        .into_inner()
        .image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").expect("a unix URL"),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(
            socket_path("/tmp/x.sock").expect("a plain path"),
            PathBuf::from("/tmp/x.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("unix://").is_err());
    }

    #[tokio::test]
    async fn missing_socket_is_an_error() {
        let err = connect("unix:///nonexistent/podsnap-cri.sock")
            .await
            .expect_err("no server listens there");
        assert!(err.to_string().contains("/nonexistent/podsnap-cri.sock"));
    }
}
