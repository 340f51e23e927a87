//! Our two images, built here as OCI image-layout archives and imported with `ctr`.
//!
//! No registry is reachable on CI, so the images are made from files of this host:
//! - [`PAUSE_IMAGE`](crate::PAUSE_IMAGE): `podsnap-workload pause` as the sandbox's process;
//! - [`WORKLOAD_IMAGE`](crate::WORKLOAD_IMAGE): the same base layer plus `/bin/busybox` and its
//!   applets as symlinks, so `sh -c` works in exec.
//!
//! `podsnap-workload` is dynamically linked: the base layer carries it at
//! [`WORKLOAD_IN_IMAGE`](crate::WORKLOAD_IN_IMAGE) and every library `ldd` lists (with the ELF
//! interpreter) at the path `ldd` prints. Layers are uncompressed tars with fixed owners and
//! times, so the same binary gives the same digests.
//!
//! The archive (OCI image layout, as `ctr images import` reads it):
//! ```text
//! oci-layout                 {"imageLayoutVersion":"1.0.0"}
//! index.json                 one manifest, named by io.containerd.image.name
//! blobs/sha256/<manifest>    config + layers
//! blobs/sha256/<config>      entrypoint, env, diff_ids
//! blobs/sha256/<layer>...    tar
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::command::run_within;
use crate::ctr::Ctr;

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// A fixed mtime for every layer entry (2023-11-14).
const MTIME: u64 = 1_700_000_000;
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A content-addressed blob.
struct Blob {
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            bytes,
        }
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.bytes.len() })
    }
}

/// An uncompressed layer tar being written; parent directories are added on demand.
struct Layer {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Layer {
    fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(size);
        header
    }

    /// Adds `path` (absolute, as in the container) as a directory, with its parents.
    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let relative = path.trim_matches('/');
        if relative.is_empty() || self.dirs.contains(relative) {
            return Ok(());
        }
        if let Some((parent, _)) = relative.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut header, format!("{relative}/"), std::io::empty())
            .with_context(|| format!("layer entry {path}"))?;
        self.dirs.insert(relative.to_owned());
        Ok(())
    }

    fn parent_of(&mut self, path: &str) -> Result<String> {
        let relative = path.trim_start_matches('/').to_owned();
        if let Some((parent, _)) = relative.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        Ok(relative)
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let relative = self.parent_of(path)?;
        let size = u64::try_from(data.len()).context("file size")?;
        let mut header = Self::header(tar::EntryType::Regular, mode, size);
        self.tar
            .append_data(&mut header, relative, data)
            .with_context(|| format!("layer entry {path}"))
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let relative = self.parent_of(path)?;
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut header, relative, target)
            .with_context(|| format!("layer entry {path} -> {target}"))
    }

    fn finish(self) -> Result<Blob> {
        let bytes = self.tar.into_inner().context("finishing a layer")?;
        Ok(Blob::new(bytes))
    }
}

/// One image archive on disk, ready for `ctr images import`.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    /// The image's full name, e.g. `localhost/podsnap/pause:1`.
    pub name: String,
    /// The OCI layout tar.
    pub path: PathBuf,
}

/// The libraries `ldd` reports for `binary`, the ELF interpreter included (absolute paths).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let listing = run_within(Command::new("ldd").arg(binary), Duration::from_secs(30))
        .with_context(|| format!("ldd {}", binary.display()))?;
    let mut libraries = Vec::new();
    for line in listing.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux... (0x...)",
        // "linux-vdso.so.1 (0x...)" (in the kernel, nothing to copy).
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(path) if path.starts_with('/') => libraries.push(PathBuf::from(path)),
            Some("not") | None => {}
            Some(_) if line.contains("not found") => {
                bail!("ldd {}: {line}", binary.display())
            }
            Some(_) => {}
        }
    }
    Ok(libraries)
}

/// The base layer: a minimal root (`/etc`, `/tmp`...), `podsnap-workload` and its libraries.
fn base_layer(workload_bin: &Path) -> Result<Blob> {
    let mut layer = Layer::new();
    for dir in [
        "/proc",
        "/sys",
        "/dev",
        "/etc",
        "/root",
        "/run",
        "/var",
        "/usr/local/bin",
    ] {
        layer.dir(dir, 0o755)?;
    }
    layer.dir("/tmp", 0o1777)?;
    // As in Debian's images: an absolute symlink to a directory, which a container may replace
    // by a real directory (the restore must not follow it out of the rootfs).
    layer.symlink("/var/run", "/run")?;
    layer.file("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    layer.file("/etc/group", b"root:x:0:\n", 0o644)?;
    layer.file("/etc/hosts", b"127.0.0.1 localhost\n", 0o644)?;
    let binary =
        std::fs::read(workload_bin).with_context(|| format!("reading {}", workload_bin.display()))?;
    layer.file(crate::WORKLOAD_IN_IMAGE, &binary, 0o755)?;
    for library in shared_libraries(workload_bin)? {
        // Follows symlinks: the image gets the file's content at the path the loader asks for.
        let bytes = std::fs::read(&library).with_context(|| format!("reading {}", library.display()))?;
        let path = library.to_string_lossy().into_owned();
        layer.file(&path, &bytes, 0o755)?;
    }
    layer.finish()
}

/// The busybox layer: `/bin/busybox` and a symlink per applet.
fn busybox_layer() -> Result<Blob> {
    let busybox = crate::prereq::BUSYBOX;
    let applets =
        run_within(Command::new(busybox).arg("--list"), Duration::from_secs(10)).context("busybox --list")?;
    let bytes = std::fs::read(busybox).with_context(|| format!("reading {busybox}"))?;
    let mut layer = Layer::new();
    layer.file("/bin/busybox", &bytes, 0o755)?;
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        layer.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    layer.finish()
}

/// Writes an OCI layout archive for an image of `layers` with `entrypoint` and `cmd`.
fn write_archive(
    name: &str,
    layers: &[&Blob],
    entrypoint: &[&str],
    cmd: &[&str],
    out: &Path,
) -> Result<ImageArchive> {
    let config = Blob::new(serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {
            "Env": [PATH_ENV],
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(),
        },
        "history": layers.iter().map(|_| json!({"created_by": "podsnap-tests"})).collect::<Vec<_>>(),
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(MEDIA_CONFIG),
        "layers": layers.iter().map(|l| l.descriptor(MEDIA_LAYER)).collect::<Vec<_>>(),
    }))?);
    let tag = name.rsplit_once(':').map(|(_, tag)| tag).unwrap_or("latest");
    let mut manifest_descriptor = manifest.descriptor(MEDIA_MANIFEST);
    manifest_descriptor["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    manifest_descriptor["annotations"] = json!({
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": tag,
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [manifest_descriptor],
    }))?;

    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |path: String, bytes: &[u8]| -> Result<()> {
        let size = u64::try_from(bytes.len()).context("blob size")?;
        let mut header = Layer::header(tar::EntryType::Regular, 0o644, size);
        archive
            .append_data(&mut header, path, bytes)
            .context("writing the image archive")
    };
    add("oci-layout".to_owned(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".to_owned(), &index)?;
    let mut written = BTreeSet::new();
    for blob in layers.iter().copied().chain([&config, &manifest]) {
        if written.insert(blob.digest.clone()) {
            let hex = blob.digest.trim_start_matches("sha256:");
            add(format!("blobs/sha256/{hex}"), &blob.bytes)?;
        }
    }
    let bytes = archive.into_inner().context("finishing the image archive")?;
    let file_name = name.replace(['/', ':'], "_") + ".oci.tar";
    let path = out.join(file_name);
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(ImageArchive {
        name: name.to_owned(),
        path,
    })
}

/// Builds the pause and workload image archives into `out`.
pub fn build(workload_bin: &Path, out: &Path) -> Result<Vec<ImageArchive>> {
    let base = base_layer(workload_bin)?;
    let busybox = busybox_layer()?;
    let entrypoint = [crate::WORKLOAD_IN_IMAGE];
    Ok(vec![
        write_archive(crate::PAUSE_IMAGE, &[&base], &entrypoint, &["pause"], out)?,
        write_archive(
            crate::WORKLOAD_IMAGE,
            &[&base, &busybox],
            &entrypoint,
            &["pause"],
            out,
        )?,
    ])
}

/// Imports `archive` into `namespace` and unpacks it for the overlayfs snapshotter.
pub fn import(ctr: &Ctr, namespace: &str, archive: &ImageArchive) -> Result<()> {
    let path = archive.path.to_string_lossy();
    ctr.run(
        namespace,
        &[
            "images",
            "import",
            "--platform",
            "linux/amd64",
            "--snapshotter",
            "overlayfs",
            &path,
        ],
    )
    .with_context(|| format!("importing {} into namespace {namespace}", archive.name))?;
    let listed = ctr.list_ids(namespace, "images")?;
    if !listed.iter().any(|image| image == &archive.name) {
        bail!(
            "after importing {} into namespace {namespace}, ctr lists only {listed:?}",
            archive.name
        );
    }
    Ok(())
}
