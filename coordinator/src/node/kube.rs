//! The one Kubernetes API call the DaemonSet's installer makes: a merge PATCH of its own node's
//! labels, with the pod's service account (in-cluster: `KUBERNETES_SERVICE_HOST` and `_PORT`,
//! the token and CA in `/var/run/secrets/kubernetes.io/serviceaccount`). The token is read again
//! for every call (kubelet rotates projected tokens).

use std::path::{Path, PathBuf};

use super::Error;

/// Where kubelet mounts the service account's credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The label the installer sets on its node once the runtime is served; the RuntimeClass
/// schedules `podsnap` pods onto nodes that carry it.
pub const READY_LABEL: &str = "podsnap.io/runtime";
/// Its value.
pub const READY_VALUE: &str = "ready";

/// A client of one API server.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token_file: PathBuf,
    http: reqwest::Client,
}

impl ApiClient {
    /// The in-cluster client (environment and service account files).
    pub fn in_cluster() -> Result<ApiClient, Error> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            Error::Api("KUBERNETES_SERVICE_HOST is not set: node labelling needs to run in a pod".to_owned())
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_owned());
        // An IPv6 address goes in brackets.
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        Self::new(
            &format!("https://{host}:{port}"),
            &dir.join("token"),
            Some(&dir.join("ca.crt")),
        )
    }

    /// A client of `base` (`https://host:port`), authenticating with the token in `token_file`,
    /// trusting only the CA certificate(s) in `ca_file` (PEM) when given.
    pub fn new(base: &str, token_file: &Path, ca_file: Option<&Path>) -> Result<ApiClient, Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("podsnap-node/", env!("CARGO_PKG_VERSION")));
        if let Some(ca_file) = ca_file {
            let pem = std::fs::read(ca_file).map_err(Error::io("reading the API server's CA", ca_file))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::Api(format!("{}: not a PEM certificate: {e}", ca_file.display())))?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Api(format!("building the API client: {e}")))?;
        Ok(ApiClient {
            base: base.trim_end_matches('/').to_owned(),
            token_file: token_file.to_path_buf(),
            http,
        })
    }

    /// Sets (`Some`) or removes (`None`) label `key` on node `node`.
    pub async fn label_node(&self, node: &str, key: &str, value: Option<&str>) -> Result<(), Error> {
        if node.is_empty() || node.contains('/') {
            return Err(Error::Api(format!("{node:?} is not a node name")));
        }
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(Error::io("reading the service account token", &self.token_file))?;
        let body = serde_json::json!({ "metadata": { "labels": { key: value } } });
        let url = format!("{}/api/v1/nodes/{node}", self.base);
        let response = self
            .http
            .patch(&url)
            .bearer_auth(token.trim())
            .header("Content-Type", "application/merge-patch+json")
            .header("Accept", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| Error::Api(format!("PATCH {url}: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or(text);
        Err(Error::Api(format!(
            "PATCH {url} answered {status}: {message}{}",
            if status.as_u16() == 403 {
                " (the service account needs `patch` on nodes: see packaging/deploy/rbac.yaml)"
            } else {
                ""
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A request as the fake API server saw it.
    #[derive(Debug, Clone, Default)]
    struct Seen {
        head: String,
        body: String,
    }

    /// Serves `answers` (status line, body) in turn over `stream`s from `listener`, recording
    /// each request.
    async fn serve<S>(stream: S, status: &str, body: &str, seen: &Arc<Mutex<Vec<Seen>>>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut stream = stream;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (head, body_start) = loop {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the client closed before a whole request");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break (String::from_utf8_lossy(&buf[..end]).into_owned(), end + 4);
            }
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_owned())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < body_start + length {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        seen.lock().expect("lock").push(Seen {
            head,
            body: String::from_utf8_lossy(&buf[body_start..body_start + length]).into_owned(),
        });
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(answer.as_bytes()).await.expect("write");
        stream.shutdown().await.ok();
    }

    fn token(dir: &Path) -> PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, "sekret-token\n").expect("token");
        path
    }

    #[tokio::test]
    async fn labels_are_set_and_removed_with_a_merge_patch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let server_seen = seen.clone();
        let server = tokio::spawn(async move {
            for (status, body) in [
                ("200 OK", "{}"),
                ("200 OK", "{}"),
                (
                    "403 Forbidden",
                    r#"{"kind":"Status","message":"nodes \"n1\" is forbidden"}"#,
                ),
            ] {
                let (stream, _) = listener.accept().await.expect("accept");
                serve(stream, status, body, &server_seen).await;
            }
        });
        let client = ApiClient::new(&format!("http://{addr}"), &token(dir.path()), None).expect("client");
        client
            .label_node("n1", READY_LABEL, Some(READY_VALUE))
            .await
            .expect("set");
        client.label_node("n1", READY_LABEL, None).await.expect("remove");
        let err = client
            .label_node("n1", READY_LABEL, None)
            .await
            .expect_err("403")
            .to_string();
        assert!(
            err.contains("403") && err.contains("is forbidden") && err.contains("rbac"),
            "{err}"
        );
        server.await.expect("server");
        let seen = seen.lock().expect("lock").clone();
        assert!(
            seen[0].head.starts_with("PATCH /api/v1/nodes/n1 HTTP/1.1"),
            "{}",
            seen[0].head
        );
        let head = seen[0].head.to_ascii_lowercase();
        assert!(head.contains("authorization: bearer sekret-token"), "{head}");
        assert!(
            head.contains("content-type: application/merge-patch+json"),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(&seen[0].body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"metadata": {"labels": {"podsnap.io/runtime": "ready"}}})
        );
        let body: serde_json::Value = serde_json::from_str(&seen[1].body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"metadata": {"labels": {"podsnap.io/runtime": null}}})
        );
        assert!(ApiClient::new("http://x", &token(dir.path()), None)
            .expect("client")
            .label_node("../x", READY_LABEL, None)
            .await
            .is_err());
    }

    /// A self-signed CA and a server certificate for 127.0.0.1, made with openssl.
    fn certificates(dir: &Path) -> (PathBuf, native_tls::Identity) {
        let run = |args: &[&str]| {
            let status = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl (install-deps installs it)");
            assert!(status.success(), "openssl {args:?}");
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
        ]);
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "ext",
        ]);
        let cert = std::fs::read(dir.join("server.crt")).expect("cert");
        let key = std::fs::read(dir.join("server.key")).expect("key");
        run(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "server.key",
            "-out",
            "server.pk8",
        ]);
        let pk8 = std::fs::read(dir.join("server.pk8")).expect("pkcs8");
        let _ = key;
        let identity = native_tls::Identity::from_pkcs8(&cert, &pk8).expect("identity");
        (dir.join("ca.crt"), identity)
    }

    #[tokio::test]
    async fn tls_trusts_the_service_account_ca_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, identity) = certificates(dir.path());
        let acceptor =
            tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).expect("acceptor"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let server_seen = seen.clone();
        let server = tokio::spawn(async move {
            // The first connection: the client that trusts the CA; the second: one that does
            // not, which gives up in the handshake.
            let (stream, _) = listener.accept().await.expect("accept");
            let tls = acceptor.accept(stream).await.expect("handshake");
            serve(tls, "200 OK", "{}", &server_seen).await;
            let (stream, _) = listener.accept().await.expect("accept");
            assert!(
                acceptor.accept(stream).await.is_err(),
                "an untrusting client completed the handshake"
            );
        });
        let base = format!("https://{addr}");
        ApiClient::new(&base, &token(dir.path()), Some(&ca))
            .expect("client")
            .label_node("n1", READY_LABEL, Some(READY_VALUE))
            .await
            .expect("PATCH over TLS");
        // The system's roots do not include our CA.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).expect("mkdir");
        let (other_ca, _) = certificates(&other);
        let err = ApiClient::new(&base, &token(dir.path()), Some(&other_ca))
            .expect("client")
            .label_node("n1", READY_LABEL, Some(READY_VALUE))
            .await
            .expect_err("an unknown CA");
        assert!(err.to_string().contains("PATCH"), "{err}");
        server.await.expect("server");
        assert_eq!(seen.lock().expect("lock").len(), 1);
    }
}
