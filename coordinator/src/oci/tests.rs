//! Unit tests of the artifact: signatures, layers, pulls against a local registry stand-in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use oci_client::secrets::RegistryAuth;
use podsnap_checkpoint::config::RegistryPolicy;
use podsnap_checkpoint::format::manifest::Manifest;
use sha2::{Digest, Sha256};

use super::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

#[test]
fn a_signature_verifies_only_for_its_manifest_and_a_trusted_key() {
    let digest = sha256_digest(b"manifest");
    let blob = sign(&key(1), &digest);
    let trusted = [key(2).verifying_key(), key(1).verifying_key()];
    assert_eq!(
        verify(&blob, &digest, &trusted),
        Ok(key_id(&key(1).verifying_key()))
    );
    // Another manifest.
    let other = sha256_digest(b"other");
    assert!(verify(&blob, &other, &trusted).is_err());
    let mut moved = blob.clone();
    moved.manifest = other.clone();
    assert!(verify(&moved, &other, &trusted)
        .expect_err("must be refused")
        .contains("does not verify"));
    // An unknown key.
    let err = verify(&blob, &digest, &[key(2).verifying_key()]).expect_err("must be refused");
    assert!(err.contains("not a trusted key"), "{err}");
    // A key id pointing at a trusted key, a signature made by another.
    let mut forged = sign(&key(3), &digest);
    forged.key = key_id(&key(1).verifying_key());
    assert!(verify(&forged, &digest, &trusted)
        .expect_err("must be refused")
        .contains("does not verify"));
    // Garbage.
    let mut garbage = blob.clone();
    garbage.signature = "zz".into();
    assert!(verify(&garbage, &digest, &trusted).is_err());
}

#[test]
fn pem_keys_from_openssl_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let private = dir.path().join("k.pem");
    let public = dir.path().join("k.pub");
    let run = |args: &[&str]| {
        let s = std::process::Command::new("openssl")
            .args(args)
            .status()
            .expect("openssl");
        assert!(s.success(), "openssl {args:?}");
    };
    run(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        private.to_str().expect("utf8"),
    ]);
    run(&[
        "pkey",
        "-in",
        private.to_str().expect("utf8"),
        "-pubout",
        "-out",
        public.to_str().expect("utf8"),
    ]);
    let sk = load_signing_key(&private).expect("private key");
    let pk = load_trusted_key(&public).expect("public key");
    assert_eq!(sk.verifying_key(), pk);
    assert!(load_signing_key(&public).is_err());
    assert!(load_trusted_key(&private).is_err());
}

#[test]
fn parts_split_containers_volumes_and_the_rest() {
    assert_eq!(part_of("containers/web/criu/pages-1.img"), "containers/web");
    assert_eq!(part_of("containers/web/config.json"), "containers/web");
    assert_eq!(part_of("volumes/data.tar"), "volumes/data.tar");
    assert_eq!(part_of("pod/dev-shm.tar"), POD_AND_HOST_PART);
    assert_eq!(part_of("host/cpuinfo.img"), POD_AND_HOST_PART);
    assert_eq!(part_of("volumes/x/y"), POD_AND_HOST_PART);
    assert_eq!(signature_tag("sha256:ab"), "sha256-ab.sig");
}

#[test]
fn only_announcements_of_the_dump_and_of_their_own_part_are_taken() {
    let dest = Path::new("/root/ckpt/web");
    let ready = |root: &str, part: &str, files: &[&str]| podsnap_checkpoint::format::layout::PartReady {
        root: PathBuf::from(root),
        part: part.to_owned(),
        files: files.iter().map(|f| (*f).to_owned()).collect(),
    };
    let app = ["containers/app/spec.dump", "containers/app/checkpoint/core-1.img"];
    assert!(announcement_fits(
        &ready("/root/ckpt/web", "containers/app", &app),
        dest
    ));
    assert!(announcement_fits(
        &ready("/root/ckpt/.web.tmp-77", "containers/app", &app),
        dest
    ));
    for (root, part, files) in [
        ("/etc", "containers/app", &app[..]),
        ("/root/ckpt/.other.tmp-77", "containers/app", &app[..]),
        ("/root/ckpt/web", "volumes/data.tar", &["volumes/data.tar"][..]),
        (
            "/root/ckpt/web",
            "containers/app",
            &["containers/db/spec.dump"][..],
        ),
        (
            "/root/ckpt/web",
            "containers/app",
            &["containers/app/../../etc/shadow"][..],
        ),
        ("/root/ckpt/web", "containers/app", &["/etc/shadow"][..]),
    ] {
        assert!(
            !announcement_fits(&ready(root, part, files), dest),
            "{root} {part} {files:?}"
        );
    }
}

/// [`credentials_from`] on `config`, helpers run from `helpers`.
fn credentials(
    config: &str,
    registry: &str,
    helpers: Option<&Path>,
) -> std::result::Result<Credentials, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(credentials_from(
        config.as_bytes(),
        Path::new("/home/ci/.docker/config.json"),
        registry,
        helpers,
    ))
}

fn basic(c: &std::result::Result<Credentials, String>) -> Option<(String, String)> {
    match c {
        Ok(Credentials {
            auth: RegistryAuth::Basic(u, p),
            ..
        }) => Some((u.clone(), p.clone())),
        _ => None,
    }
}

fn pair(u: &str, p: &str) -> Option<(String, String)> {
    Some((u.to_owned(), p.to_owned()))
}

#[test]
fn docker_config_credentials() {
    let text = r#"{"auths": {"https://reg.example.com/v1/": {"auth": "dXNlcjpwYXNz"},
        "127.0.0.1:5000": {"username": "a", "password": "b", "email": "x@y"}}}"#;
    assert_eq!(
        basic(&credentials(text, "reg.example.com", None)),
        pair("user", "pass")
    );
    assert_eq!(
        basic(&credentials(text, "Reg.Example.com", None)),
        pair("user", "pass")
    );
    assert_eq!(basic(&credentials(text, "127.0.0.1:5000", None)), pair("a", "b"));
    let other = credentials(text, "other", None).expect("anonymous");
    assert_eq!(other.auth, RegistryAuth::Anonymous);
    assert!(
        other
            .source
            .contains("no entry for other in /home/ci/.docker/config.json"),
        "{}",
        other.source
    );
    assert!(credentials(r#"{"auths": {"x": {"auth": "!!"}}}"#, "x", None).is_err());
    let token = credentials(r#"{"auths": {"x": {"identitytoken": "t"}}}"#, "x", None);
    assert!(token.expect_err("an identity token").contains("identity token"));
}

#[test]
fn docker_hub_credentials_match_docker_io() {
    let text = r#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"}}}"#;
    for registry in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
        let c = credentials(text, registry, None);
        assert_eq!(basic(&c), pair("user", "pass"), "{registry}: {c:?}");
        assert!(
            c.expect("credentials")
                .source
                .contains("https://index.docker.io/v1/"),
            "{registry}"
        );
    }
    // A key written as a host also counts for the Hub.
    let text = r#"{"auths": {"docker.io": {"username": "u", "password": "p"}}}"#;
    assert_eq!(basic(&credentials(text, "docker.io", None)), pair("u", "p"));
}

/// A fake credential helper in `dir`: it knows `server` (user `user`, secret `secret`), and
/// answers docker's "not found" for every other server.
fn fake_helper(dir: &Path, name: &str, server: &str, user: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r server\nif [ \"$server\" = \"{server}\" ]; then\n  \
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"secret\"}}' \"$server\"\nelse\n  \
             echo '{HELPER_NOT_FOUND}'; exit 1\nfi\n"
        ),
    )
    .expect("write the helper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn credential_helpers_are_asked_as_docker_asks_them() {
    let t = tempfile::tempdir().expect("tempdir");
    fake_helper(t.path(), "store", "https://index.docker.io/v1/", "hub-user");
    fake_helper(t.path(), "ecr", "1234.dkr.ecr.example.com", "AWS");
    fake_helper(t.path(), "tokens", "tokens.example.com", "<token>");
    let helpers = Some(t.path());
    let config = r#"{"credsStore": "store",
        "credHelpers": {"1234.dkr.ecr.example.com": "ecr", "tokens.example.com": "tokens"},
        "auths": {"https://index.docker.io/v1/": {"auth": "ZmlsZTpmaWxl"},
                  "plain.example.com": {"auth": "ZmlsZTpmaWxl"}}}"#;
    // The store (credsStore) wins over auths, for the Hub by its v1 address.
    let hub = credentials(config, "docker.io", helpers);
    assert_eq!(basic(&hub), pair("hub-user", "secret"), "{hub:?}");
    let source = hub.expect("credentials").source;
    assert!(
        source.contains("docker-credential-store (credsStore in /home/ci/.docker/config.json)"),
        "{source}"
    );
    // credHelpers names the helper of its registry.
    let ecr = credentials(config, "1234.dkr.ecr.example.com", helpers);
    assert_eq!(basic(&ecr), pair("AWS", "secret"), "{ecr:?}");
    assert!(ecr.expect("credentials").source.contains("credHelpers"));
    // A helper without credentials for the registry: anonymous, as docker goes, and said.
    let none = credentials(config, "plain.example.com", helpers).expect("anonymous");
    assert_eq!(none.auth, RegistryAuth::Anonymous);
    assert!(
        none.source.contains("docker-credential-store") && none.source.contains("has none"),
        "{}",
        none.source
    );
    // An identity token cannot be used: refused, not sent as something else.
    let token = credentials(config, "tokens.example.com", helpers).expect_err("a token");
    assert!(token.contains("identity token"), "{token}");
    // A helper that does not exist is an error naming it, not a silent anonymous pull.
    let missing =
        credentials(r#"{"credsStore": "nowhere"}"#, "docker.io", helpers).expect_err("no such helper");
    assert!(missing.contains("docker-credential-nowhere"), "{missing}");
}

#[test]
fn registry_errors_say_which_credentials_were_tried() {
    let credentials = Credentials {
        auth: RegistryAuth::Anonymous,
        source: "anonymous: no entry for docker.io in /root/.docker/config.json".into(),
    };
    let e = tried(&credentials)(refused("fetching the manifest (docker.io/x/y:1): unauthorized"));
    assert!(
        e.to_string()
            .contains("credentials tried: anonymous: no entry for docker.io"),
        "{e}"
    );
}

#[test]
fn a_signature_that_verifies_only_without_strictness_is_refused() {
    // The identity point as a public key (a weak key of small order), R the identity and
    // S = 0: [S]B = R + [k]A holds for every message, so a plain `verify` accepts it.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = VerifyingKey::from_bytes(&identity).expect("the identity point decodes");
    let digest = sha256_digest(b"manifest");
    let forged = SignatureBlob {
        manifest: digest.clone(),
        key: key_id(&weak),
        signature: hex::encode({
            let mut s = [0u8; 64];
            s[..32].copy_from_slice(&identity);
            s
        }),
    };
    let err = verify(&forged, &digest, &[weak]).expect_err("a weak-key signature is refused");
    assert!(err.contains("does not verify"), "{err}");
}

#[test]
fn a_registry_not_allowed_is_refused_by_name() {
    let policy = RegistryPolicy {
        allowed: vec!["127.0.0.1:5000".into()],
        ..Default::default()
    };
    assert!(checked_reference("127.0.0.1:5000/ckpt/web:1", &policy, "cfg").is_ok());
    let err = checked_reference("evil.example.com/ckpt/web:1", &policy, "cfg")
        .expect_err("must be refused")
        .to_string();
    assert!(
        err.contains("evil.example.com") && err.contains("not allowed"),
        "{err}"
    );
    assert!(checked_reference("not a ref", &policy, "cfg").is_err());
}

#[test]
fn the_unpacker_refuses_what_the_manifest_does_not_list() {
    let mut files = BTreeMap::new();
    files.insert(
        "containers/web/a".to_owned(),
        podsnap_checkpoint::format::digest::FileDigest {
            size: 3,
            digest: hex::encode(Sha256::digest(b"abc")),
        },
    );
    let layer = |entries: &[(&str, &[u8], tar::EntryType)]| {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data, kind) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            b.append_data(&mut h, name, *data).expect("append");
        }
        zstd::encode_all(&b.into_inner().expect("tar")[..], 1).expect("zstd")
    };
    let run = |blob: Vec<u8>,
               part: &str,
               files: &BTreeMap<String, podsnap_checkpoint::format::digest::FileDigest>| {
        let staging = tempfile::tempdir().expect("tempdir");
        let m = test_manifest(files.clone());
        let d = sha256_digest(&blob);
        let n = blob.len() as u64;
        unpack_stream(&blob[..], part, staging.path(), &m, (d, n))
    };
    let good = layer(&[("containers/web/a", b"abc", tar::EntryType::Regular)]);
    assert!(run(good.clone(), "containers/web", &files).is_ok());
    assert!(run(good.clone(), "containers/db", &files)
        .expect_err("must be refused")
        .contains("belongs to part"));
    assert!(run(
        layer(&[("containers/web/b", b"abc", tar::EntryType::Regular)]),
        "containers/web",
        &files
    )
    .expect_err("must be refused")
    .contains("not a file of the checkpoint"));
    assert!(run(
        layer(&[("containers/web/a", b"abcd", tar::EntryType::Regular)]),
        "containers/web",
        &files
    )
    .expect_err("must be refused")
    .contains("bytes"));
    assert!(run(
        layer(&[("containers/web/a", b"", tar::EntryType::Symlink)]),
        "containers/web",
        &files
    )
    .expect_err("must be refused")
    .contains("not a regular file"));
    // The listed size, other bytes: refused by the file's digest as it is written.
    let err = run(
        layer(&[("containers/web/a", b"abd", tar::EntryType::Regular)]),
        "containers/web",
        &files,
    )
    .expect_err("must be refused");
    assert!(
        err.contains("has digest") && err.contains("the manifest lists"),
        "{err}"
    );
    // A blob that is not what its descriptor says.
    let staging = tempfile::tempdir().expect("tempdir");
    let m = test_manifest(files.clone());
    let err = unpack_stream(
        &good[..],
        "containers/web",
        staging.path(),
        &m,
        (sha256_digest(b"x"), good.len() as u64),
    )
    .expect_err("must be refused");
    assert!(err.contains("digest"), "{err}");
}

fn test_manifest(files: BTreeMap<String, podsnap_checkpoint::format::digest::FileDigest>) -> Manifest {
    let mut m: Manifest = serde_json::from_value(serde_json::json!({
        "format": podsnap_checkpoint::format::manifest::FORMAT,
        "version": podsnap_checkpoint::format::manifest::VERSION,
        "created_unix": 0,
        "pod": {"sandbox_id": "s", "name": "web", "namespace": "default", "uid": null, "hostname": null},
        "host": {"criu_version": "4.2.1", "runc_version": "1.1.5", "kernel": "6.18", "arch": "x86_64"},
        "tcp_established": false,
        "containers": [], "volumes": [], "files": {},
    }))
    .unwrap_or_else(|e| panic!("a manifest: {e}"));
    m.files = files;
    m
}
