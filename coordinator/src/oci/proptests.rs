//! Properties of what a pull reads from a registry before and while it trusts it: the OCI
//! manifest, the signature blob, and each layer's zstd-compressed tar. Valid ones built as a push
//! builds them, mutated, give an error or a value: never a panic, never memory out of
//! proportion to what was downloaded, never a file outside the staging directory.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::SigningKey;
use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use podsnap_checkpoint::config::RegistryPolicy;
use podsnap_checkpoint::format::digest::{FileDigest, StreamDigest};
use podsnap_checkpoint::testkit::{
    assert_bounded, cases, edit_tar_headers, mutate, mutate_json, peak_during, Mutation, TarEdit,
};
use proptest::prelude::*;

use super::*;

/// A GNU tar as a push writes one (regular files, 0600, owner 0:0, mtime 0; names longer than
/// the header's field go first in a long-name entry).
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(0);
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// The part `containers/web`: a short name, a name past 100 bytes, an empty file.
fn layer_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("containers/web/checkpoint/pages-1.img".into(), vec![7u8; 3000]),
        (
            format!("containers/web/checkpoint/{}.img", "n".repeat(120)),
            b"long".to_vec(),
        ),
        ("containers/web/spec.dump".into(), Vec::new()),
    ]
}

/// The manifest listing `files` (BLAKE3 digests, as a dump writes them).
fn manifest_of(files: &[(String, Vec<u8>)]) -> Manifest {
    let mut m: Manifest = serde_json::from_value(serde_json::json!({
        "format": podsnap_checkpoint::format::manifest::FORMAT,
        "version": podsnap_checkpoint::format::manifest::VERSION,
        "created_unix": 0,
        "pod": {"sandbox_id": "s", "name": "web", "namespace": "default", "uid": null, "hostname": null},
        "host": {"criu_version": "4.2.1", "runc_version": "1.1.5", "kernel": "6.18", "arch": "x86_64"},
        "tcp_established": false,
        "containers": [], "volumes": [], "files": {},
        "digest_algorithm": "blake3",
    }))
    .unwrap_or_else(|e| panic!("a manifest: {e}"));
    m.files = files
        .iter()
        .map(|(name, data)| {
            let digest = FileDigest {
                size: data.len() as u64,
                digest: {
                    let mut d =
                        StreamDigest::new(podsnap_checkpoint::format::digest::DigestAlgorithm::Blake3);
                    d.update(data);
                    d.finish()
                },
            };
            (name.clone(), digest)
        })
        .collect::<BTreeMap<_, _>>();
    m
}

/// Unpacks `blob` as part `containers/web` into `<tmp>/staging`, beside `<tmp>/outside`.
fn unpack_into(tmp: &Path, blob: &[u8], m: &Manifest) -> std::result::Result<u64, String> {
    let staging = tmp.join("staging");
    std::fs::create_dir_all(&staging).expect("mkdir");
    unpack_stream(
        blob,
        "containers/web",
        &staging,
        m,
        (sha256_digest(blob), blob.len() as u64),
    )
}

/// Everything under `dir` but `staging`: names, types, contents.
fn beside_staging(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list").flatten() {
            let p = e.path();
            if p == dir.join("staging") {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).expect("stat");
            if m.is_dir() {
                stack.push(p.clone());
            }
            let what = if m.is_file() {
                format!("{:?}", std::fs::read(&p).expect("read"))
            } else {
                format!("{:?}", m.file_type())
            };
            out.push((p, what));
        }
    }
    out.sort();
    out
}

/// Found by reading the unpacker for what the property tests bound: a layer whose tar holds a
/// GNU long-name entry of 64 MiB (a few KiB once compressed) made the tar reader hold the whole
/// name in memory before the layer's digest could be checked (at the end of the stream): a
/// registry, or anything between it and the node, could exhaust a node's memory with a small
/// blob whatever signature the checkpoint has.
#[test]
fn a_long_name_bomb_is_refused_in_bounded_memory() {
    let mut tar = Vec::new();
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().expect("gnu").name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(64 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.resize(tar.len() + (64 << 20), b'a');
    tar.extend(tar_of(&[("containers/web/spec.dump", b"")]));
    let blob = zstd::encode_all(&tar[..], 3).expect("zstd");
    drop(tar);
    assert!(blob.len() < 64 << 10, "{} bytes compressed", blob.len());
    let t = tempfile::tempdir().expect("tempdir");
    let m = manifest_of(&[("containers/web/spec.dump".into(), Vec::new())]);
    let (result, peak) = peak_during(|| unpack_into(t.path(), &blob, &m));
    assert!(peak < 8 << 20, "held {peak} bytes for a {} byte blob", blob.len());
    let err = result.expect_err("refused");
    assert!(err.contains("long name"), "{err}");
}

#[test]
fn the_layer_unpacks_whole() {
    let files = layer_files();
    let m = manifest_of(&files);
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    let blob = zstd::encode_all(&tar_of(&refs)[..], 1).expect("zstd");
    let t = tempfile::tempdir().expect("tempdir");
    assert_eq!(unpack_into(t.path(), &blob, &m), Ok(blob.len() as u64));
    for (name, data) in &files {
        assert_eq!(
            &std::fs::read(t.path().join("staging").join(name)).expect("read"),
            data
        );
    }
}

/// Names that try to leave the staging directory or name what the manifest does not list.
const NAMES: [&[u8]; 8] = [
    b"../outside/x",
    b"/tmp/x",
    b"containers/web/../../../x",
    b"containers/web/spec.dump",
    b"containers/web/checkpoint/pages-1.img",
    b"containers/db/x",
    b".",
    b"containers/web/spec.dump/x",
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(300),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A layer mutated in its tar (header fields, bytes) or in its compressed bytes: unpacked
    /// whole or refused, in bounded memory, never writing beside the staging directory; what it
    /// accepts is exactly the listed files.
    #[test]
    fn mutated_layers_never_write_outside_the_staging_directory(
        edits in prop::collection::vec(any::<TarEdit>(), 0..4),
        m in prop::collection::vec(any::<Mutation>(), 0..3),
        compressed_m in prop::collection::vec(any::<Mutation>(), 0..2),
    ) {
        let files = layer_files();
        let manifest = manifest_of(&files);
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let tar = mutate(&edit_tar_headers(&tar_of(&refs), &edits, &NAMES), &m);
        let blob = mutate(&zstd::encode_all(&tar[..], 1).expect("zstd"), &compressed_m);
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(t.path().join("outside")).expect("mkdir");
        std::fs::write(t.path().join("outside/x"), b"outside").expect("write");
        let before = beside_staging(t.path());
        // The decoder's window is C memory, not counted; the copy buffer is 1 MiB.
        let unpacked = assert_bounded("unpack_stream", tar.len(), 4, 4 << 20, || {
            unpack_into(t.path(), &blob, &manifest)
        });
        prop_assert_eq!(beside_staging(t.path()), before);
        // What is written (accepted or not) is only listed files, each whole once accepted.
        let staging = t.path().join("staging");
        let mut stack = vec![staging.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("list").flatten() {
                let meta = std::fs::symlink_metadata(e.path()).expect("stat");
                if meta.is_dir() {
                    stack.push(e.path());
                    continue;
                }
                prop_assert!(meta.is_file(), "{:?} is not a regular file", e.path());
                let rel = e.path().strip_prefix(&staging).expect("beneath").to_string_lossy().into_owned();
                let listed = files.iter().find(|(n, _)| *n == rel);
                prop_assert!(listed.is_some(), "{rel} is not listed");
                if unpacked.is_ok() {
                    let data = &listed.expect("listed").1;
                    prop_assert_eq!(&std::fs::read(e.path()).expect("read"), data);
                }
            }
        }
    }

    /// The OCI manifest a push writes, mutated as JSON and as bytes: parsed or refused.
    #[test]
    fn mutated_oci_manifests_are_parsed_or_refused(
        picks in prop::collection::vec(any::<(u32, u8, u32)>(), 0..5),
        m in prop::collection::vec(any::<Mutation>(), 0..3),
    ) {
        let layer = serde_json::json!({
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": sha256_digest(b"layer"),
            "size": 5,
            "annotations": {PART_ANNOTATION: "containers/web"},
        });
        let mut v = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": sha256_digest(b"{}"), "size": 2},
            "layers": [layer],
        });
        mutate_json(&mut v, &picks);
        let bytes = mutate(&serde_json::to_vec(&v).expect("json"), &m);
        let parsed = assert_bounded("parse_artifact", bytes.len(), 32, 64 << 10, || {
            parse_artifact(&bytes, "the manifest")
        });
        if let Ok(a) = parsed {
            prop_assert_eq!(a.schema_version, 2);
            for l in &a.layers {
                let _ = part_of(&l.digest);
            }
        }
    }

    /// A signature blob mutated as JSON or bytes never verifies unless it is the signed blob.
    #[test]
    fn mutated_signatures_never_verify(
        picks in prop::collection::vec(any::<(u32, u8, u32)>(), 0..4),
        m in prop::collection::vec(any::<Mutation>(), 0..3),
    ) {
        let key = SigningKey::from_bytes(&[9; 32]);
        let digest = sha256_digest(b"the manifest");
        let blob = sign(&key, &digest);
        let mut v = serde_json::to_value(&blob).expect("json");
        mutate_json(&mut v, &picks);
        let bytes = mutate(&serde_json::to_vec(&v).expect("json"), &m);
        if let Ok(parsed) = serde_json::from_slice::<SignatureBlob>(&bytes) {
            let verified = verify(&parsed, &digest, &[key.verifying_key()]);
            let same_signature = hex::decode(&parsed.signature).ok() == hex::decode(&blob.signature).ok();
            prop_assert!(
                verified.is_err() || (parsed.manifest == blob.manifest && parsed.key == blob.key && same_signature),
                "{parsed:?} verified"
            );
        }
    }

    /// References and part names: any text is parsed or refused.
    #[test]
    fn any_reference_is_parsed_or_refused(reference in "\\PC{0,80}", allowed in "[a-z0-9.:]{0,20}") {
        let policy = RegistryPolicy {
            allowed: vec![allowed],
            ..RegistryPolicy::default()
        };
        if let Ok(r) = checked_reference(&reference, &policy, "cfg") {
            prop_assert!(policy.allows(r.registry()));
            let _ = signature_tag(&reference);
        }
        let _ = part_of(&reference);
    }
}
