//! The checkpoint crate's layers, checked from its source: no module of a lower layer names a
//! higher one, nor a sibling of its own rank (REFACTOR_PLAN.md 1.1; `checkpoint/src/lib.rs`):
//!
//! | rank | modules |
//! | --- | --- |
//! | 0 | `error`, `failpoint` |
//! | 1 | `fs` |
//! | 2 | `format`, `config` |
//! | 3 | `criu`, `archive` |
//! | 4 | `trust` |
//! | 5 | `node` |
//! | 6 | `pod` (its `mod.rs`, `spec`, `target`, `shared`) |
//! | 7 | `pod::dump`, `pod::restore` (which never name each other) |
//!
//! A file's module is where it lies (`fs/confined.rs` is `fs`, `pod/dump/plan.rs` is
//! `pod::dump`); what it names is every `crate::` path in its code (comments and string
//! literals stripped by a small scanner; `use crate::{a, b::c}` groups too). Files of one module
//! name each other freely. A path across modules is a `crate::` path: `super::super` is refused.
//! `lib.rs` (the re-exports) and `testkit.rs` (test helpers) are not ranked; `lib.rs` declares
//! only the layers (and the test kit), each a file of its own: no module written inline there.
//!
//! Also: no protobuf, ttrpc, tonic or prost in the checkpoint crate (its Cargo.toml and its
//! code), the suite does not depend on the checkpoint crate, and every `docs/` file the README
//! links to exists. No node is started: this runs in the normal test pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The ranked modules (see the header).
const RANKS: &[(&str, u32)] = &[
    ("error", 0),
    ("failpoint", 0),
    ("fs", 1),
    ("format", 2),
    ("config", 2),
    ("criu", 3),
    ("archive", 3),
    ("trust", 4),
    ("node", 5),
    ("pod", 6),
    ("pod::dump", 7),
    ("pod::restore", 7),
];

/// Not ranked on purpose.
const EXEMPT: &[&str] = &["lib.rs", "testkit.rs"];

/// The crate's flat files from before the layers, not moved yet (with their folders of
/// property tests): unranked, allowed while they exist. Emptied once the move lands; an entry
/// whose file is gone fails, so the list only shrinks.
const NOT_MOVED_YET: &[&str] = &[];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Source with comments, string and char literals blanked (newlines kept, for line numbers).
fn strip(source: &str) -> String {
    let b: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&b, i) {
            // A raw string r"..", r#".."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match b.get(j) {
                    None => break,
                    Some('"') if (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    _ => j += 1,
                }
            }
            for &ch in &b[i..j.min(b.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            let end = if next == Some('\\') {
                b[i + 2..].iter().position(|&ch| ch == '\'').map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    for _ in i..=e {
                        out.push(' ');
                    }
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

fn ident_at(b: &[char], mut i: usize) -> (String, usize) {
    while i < b.len() && b[i].is_whitespace() {
        i += 1;
    }
    let start = i;
    while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
        i += 1;
    }
    (b[start..i].iter().collect(), i)
}

/// After `crate::` at `i`: the paths named, as up to two segments (`pod::dump`, `fs`).
fn paths_at(b: &[char], i: usize, out: &mut Vec<String>) {
    let mut j = i;
    while j < b.len() && b[j].is_whitespace() {
        j += 1;
    }
    if b.get(j) == Some(&'{') {
        // A group: each item, split at top-level commas.
        let mut depth = 0;
        let mut k = j + 1;
        let mut item_start = k;
        while k < b.len() {
            match b[k] {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    group_item(b, item_start, k, out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    group_item(b, item_start, k, out);
                    item_start = k + 1;
                }
                _ => {}
            }
            k += 1;
        }
        return;
    }
    let (first, after) = ident_at(b, j);
    if first.is_empty() {
        return;
    }
    let mut path = first;
    let mut k = after;
    while k < b.len() && b[k].is_whitespace() {
        k += 1;
    }
    if b.get(k) == Some(&':') && b.get(k + 1) == Some(&':') {
        let (second, _) = ident_at(b, k + 2);
        if !second.is_empty() {
            path = format!("{path}::{second}");
        } else if b
            .get(k + 2..)
            .is_some_and(|r| r.iter().find(|c| !c.is_whitespace()) == Some(&'{'))
        {
            // `crate::pod::{dump::X, spec}`: each item under `pod`.
            let mut inner = Vec::new();
            paths_at(b, k + 2, &mut inner);
            for p in inner {
                out.push(format!("{path}::{p}"));
            }
            return;
        }
    }
    out.push(path);
}

fn group_item(b: &[char], start: usize, end: usize, out: &mut Vec<String>) {
    let text: String = b[start..end].iter().collect();
    if text.trim().is_empty() || text.trim() == "self" {
        return;
    }
    let chars: Vec<char> = text.chars().collect();
    paths_at(&chars, 0, out);
}

/// Every `crate::` path in `code` (stripped), with its line; and the lines with `super::super`.
fn crate_paths(code: &str) -> (Vec<(usize, String)>, Vec<usize>) {
    let b: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    let mut supers = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < b.len() {
        if b[i] == '\n' {
            line += 1;
        }
        let at = |s: &str| b[i..].iter().take(s.len()).copied().eq(s.chars());
        if at("crate") && !ident_before(&b, i) && b.get(i.wrapping_sub(1)) != Some(&'$') {
            let mut j = i + 5;
            while j < b.len() && b[j].is_whitespace() {
                j += 1;
            }
            if b.get(j) == Some(&':') && b.get(j + 1) == Some(&':') {
                let mut paths = Vec::new();
                paths_at(&b, j + 2, &mut paths);
                found.extend(paths.into_iter().map(|p| (line, p)));
            }
        }
        if at("super") && !ident_before(&b, i) {
            let rest: String = b[i..].iter().take(40).filter(|c| !c.is_whitespace()).collect();
            if rest.starts_with("super::super") {
                supers.push(line);
            }
        }
        i += 1;
    }
    (found, supers)
}

/// The module a file is ranked as (`pod::dump` for `pod/dump/x.rs`, `fs` for `fs/a/b.rs`),
/// or None when it lies outside every ranked module.
fn module_of(rel: &str) -> Option<&'static str> {
    let parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
    if parts.len() >= 2 && parts[0] == "pod" {
        let two = format!("pod::{}", parts[1]);
        if let Some((m, _)) = RANKS.iter().find(|(m, _)| *m == two) {
            return Some(m);
        }
    }
    RANKS.iter().find(|(m, _)| *m == parts[0]).map(|(m, _)| *m)
}

/// Names `lib.rs` re-exports at the crate's root (`pub use error::{Error, Result};`), with the
/// module path they come from.
fn root_names(lib: &str) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for statement in strip(lib).split(';') {
        let Some(rest) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest.trim().trim_start_matches("crate::");
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let module = match items.split_once("::") {
            Some((second, _)) if module == "pod" || module == "format" => format!("{module}::{second}"),
            _ => module.to_owned(),
        };
        for item in items.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if item.starts_with(|c: char| c.is_uppercase()) {
                names.insert(item.to_owned(), module.clone());
            }
        }
    }
    names
}

/// The module a `crate::` path names (its two segments), if ranked.
fn named_module(path: &str, roots: &BTreeMap<String, String>) -> Option<&'static str> {
    if let Some(module) = roots.get(path.split("::").next().unwrap_or_default()) {
        return named_module(module, &BTreeMap::new());
    }
    let mut it = path.split("::");
    let first = it.next().unwrap_or_default();
    if first == "pod" {
        if let Some(second) = it.next() {
            let two = format!("pod::{second}");
            if let Some((m, _)) = RANKS.iter().find(|(m, _)| *m == two) {
                return Some(m);
            }
        }
    }
    RANKS.iter().find(|(m, _)| *m == first).map(|(m, _)| *m)
}

fn rank(module: &str) -> u32 {
    RANKS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, r)| *r)
        .unwrap_or(u32::MAX)
}

/// What is wrong with the crate whose files (relative path -> source) are `files`.
fn violations(files: &BTreeMap<String, String>, not_moved: &[&str]) -> Vec<String> {
    let mut wrong = Vec::new();
    let roots = root_names(files.get("lib.rs").map_or("", String::as_str));
    let exempt = |path: &str| {
        let first = path.split("::").next().unwrap_or_default();
        EXEMPT.iter().any(|f| f.trim_end_matches(".rs") == first)
    };
    let old_module = |name: &str| {
        not_moved
            .iter()
            .any(|f| f.trim_end_matches(".rs") == name.split("::").next().unwrap_or_default())
    };
    for (rel, source) in files {
        if EXEMPT.contains(&rel.as_str()) {
            continue;
        }
        let first = rel.split('/').next().unwrap_or_default();
        let Some(from) = module_of(rel) else {
            if !old_module(first.trim_end_matches(".rs")) {
                wrong.push(format!(
                    "{rel}: in no layer (rank it in tests/tests/layering.rs and lib.rs, or move it)"
                ));
            }
            continue;
        };
        let (paths, supers) = crate_paths(&strip(source));
        for line in supers {
            wrong.push(format!(
                "{rel}:{line}: super::super (name another module by its crate:: path)"
            ));
        }
        for (line, path) in paths {
            let Some(to) = named_module(&path, &roots) else {
                if !old_module(&path) && !exempt(&path) {
                    wrong.push(format!("{rel}:{line}: crate::{path} is in no layer"));
                }
                continue;
            };
            if to == from {
                continue;
            }
            // pod's own files (rank 6) and its pipelines (7) share the `pod` folder: a pipeline
            // may name pod's lower files; pod's lower files may not name a pipeline.
            let (rf, rt) = (rank(from), rank(to));
            if rt > rf {
                wrong.push(format!(
                    "{rel}:{line}: {from} (rank {rf}) names crate::{path}, of {to} (rank {rt}): a higher layer"
                ));
            } else if rt == rf {
                wrong.push(format!(
                    "{rel}:{line}: {from} names crate::{path}, of {to}: a sibling of the same rank {rf}"
                ));
            }
        }
    }
    wrong
}

fn sources(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(root)
                    .expect("under the root")
                    .to_string_lossy()
                    .into_owned();
                let text =
                    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                out.insert(rel, text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn no_checkpoint_module_names_a_higher_layer() {
    let src = workspace().join("checkpoint/src");
    let files = sources(&src);
    let stale: Vec<&&str> = NOT_MOVED_YET.iter().filter(|f| !src.join(f).exists()).collect();
    assert!(
        stale.is_empty(),
        "moved into the layers: remove {stale:?} from NOT_MOVED_YET in tests/tests/layering.rs"
    );
    let wrong = violations(&files, NOT_MOVED_YET);
    assert!(
        wrong.is_empty(),
        "layering of checkpoint/src:\n{}",
        wrong.join("\n")
    );
}

/// What is wrong with `lib.rs`'s modules: each is a file of its own and a layer (or the test
/// kit), never a module written inline (the re-export-only modules with the flat names from
/// before the layers, `pub mod manifest { pub use crate::format::manifest::*; }`, are gone: a
/// caller names the layer).
fn root_module_problems(lib: &str) -> Vec<String> {
    let code = strip(lib);
    let mut wrong = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("mod ") {
        let before = &rest[..at];
        rest = &rest[at + 4..];
        if before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let after = rest.trim_start()[name.len()..].trim_start();
        if after.starts_with('{') {
            wrong.push(format!(
                "lib.rs: `mod {name} {{ ... }}` inline: name its layer instead"
            ));
        } else if name != "testkit" && !RANKS.iter().any(|(m, _)| *m == name) {
            wrong.push(format!("lib.rs: `mod {name}` is in no layer"));
        }
    }
    wrong
}

#[test]
fn the_crate_root_declares_only_its_layers() {
    let lib = workspace().join("checkpoint/src/lib.rs");
    let text = std::fs::read_to_string(&lib).unwrap_or_else(|e| panic!("{}: {e}", lib.display()));
    let wrong = root_module_problems(&text);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_a_compatibility_module() {
    let layers = "pub mod error;\npub mod format;\n#[cfg(test)]\npub mod testkit;\n";
    assert!(root_module_problems(layers).is_empty());
    let compat = format!("{layers}pub mod manifest {{\n    pub use crate::format::manifest::*;\n}}\n");
    assert_eq!(root_module_problems(&compat).len(), 1, "{compat}");
    assert_eq!(root_module_problems("pub mod dump;\n").len(), 1);
    // In a comment it is no module.
    assert!(root_module_problems("// pub mod manifest { }\npub mod fs;\n").is_empty());
}

#[test]
fn the_checker_sees_an_upward_import() {
    let files = |code: &str| {
        BTreeMap::from([
            ("fs/mod.rs".to_owned(), code.to_owned()),
            ("pod/dump/mod.rs".to_owned(), "use crate::fs::x;\n".to_owned()),
        ])
    };
    assert!(violations(&files("use crate::error::Result;\nuse crate::testkit::x;\n"), &[]).is_empty());
    // A name lib.rs re-exports at the root is ranked as the module it comes from.
    let mut rooted = files("use crate::Manifest;\n");
    rooted.insert(
        "lib.rs".to_owned(),
        "pub use format::manifest::{Manifest};\npub use error::{Error, Result};\n".to_owned(),
    );
    assert_eq!(
        violations(&rooted, &[]).len(),
        1,
        "{:?}",
        violations(&rooted, &[])
    );
    rooted.insert("fs/mod.rs".to_owned(), "use crate::Result;\n".to_owned());
    assert!(
        violations(&rooted, &[]).is_empty(),
        "{:?}",
        violations(&rooted, &[])
    );
    for planted in [
        "use crate::pod::dump::Phases;\n",
        "use crate::{error::Error, pod::dump};\n",
        "use crate::pod::{spec, dump::X};\n",
        "fn f() { crate::trust::seal::holds(); }\n",
        "use crate::format::Manifest;\n",
        "use super::super::x;\n",
    ] {
        let wrong = violations(&files(planted), &[]);
        assert!(!wrong.is_empty(), "not seen: {planted}");
    }
    // Not code: comments and strings.
    for hidden in [
        "// use crate::pod::dump;\n",
        "/* crate::pod::dump */\n",
        "const S: &str = \"crate::pod::dump\";\n",
        "const R: &str = r#\"crate::pod\"#;\n",
        "fn f<'a>(c: char) -> bool { c == '\"' }\n",
    ] {
        assert!(violations(&files(hidden), &[]).is_empty(), "{hidden}");
    }
    // Siblings of one rank, and the two pipelines.
    let siblings = BTreeMap::from([
        ("format/mod.rs".to_owned(), "use crate::config::X;\n".to_owned()),
        (
            "pod/restore/plan.rs".to_owned(),
            "use crate::pod::dump::Y;\n".to_owned(),
        ),
        (
            "pod/spec.rs".to_owned(),
            "use crate::pod::restore::Z;\n".to_owned(),
        ),
        (
            "pod/dump/plan.rs".to_owned(),
            "use crate::pod::shared::links;\n".to_owned(),
        ),
    ]);
    assert_eq!(
        violations(&siblings, &[]).len(),
        3,
        "{:?}",
        violations(&siblings, &[])
    );
    // A file in no layer.
    let lost = BTreeMap::from([("helpers.rs".to_owned(), String::new())]);
    assert_eq!(violations(&lost, &[]).len(), 1);
    assert!(violations(&lost, &["helpers.rs"]).is_empty());
}

/// The `[dependencies]` section of a Cargo.toml (up to the next section).
fn dependencies(manifest: &Path) -> String {
    let text = std::fs::read_to_string(manifest).unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
    let mut section = String::new();
    let mut inside = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            inside = trimmed == "[dependencies]";
            continue;
        }
        if inside {
            section.push_str(trimmed);
            section.push('\n');
        }
    }
    section
}

#[test]
fn the_checkpoint_crate_knows_no_protobuf() {
    let root = workspace();
    let deps = dependencies(&root.join("checkpoint/Cargo.toml"));
    for name in [
        "protobuf",
        "ttrpc",
        "tonic",
        "prost",
        "containerd-shim",
        "containerd-client",
    ] {
        assert!(
            !deps.lines().any(|l| l.starts_with(name)),
            "checkpoint/Cargo.toml depends on {name}"
        );
    }
    for (rel, source) in sources(&root.join("checkpoint/src")) {
        let code = strip(&source);
        for name in ["protobuf::", "ttrpc::", "tonic::", "prost::", "protos::"] {
            assert!(!code.contains(name), "checkpoint/src/{rel} names {name}");
        }
    }
}

#[test]
fn the_suite_depends_on_no_crate_below_the_coordinator() {
    let deps = dependencies(&workspace().join("tests/Cargo.toml"));
    for name in ["podsnap-checkpoint", "podsnap-runtime", "podsnap-shim"] {
        assert!(
            !deps.lines().any(|l| l.starts_with(name)),
            "tests/Cargo.toml depends on {name}: check checkpoints through podsnap (inspect, list) \
             or tests/src/checkpoint.rs"
        );
    }
}

#[test]
fn every_docs_link_of_the_readme_resolves() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut links = 0;
    for (i, _) in readme.match_indices("](docs/") {
        let rest = &readme[i + 2..];
        let end = rest.find([')', '#']).expect("a closed link");
        let target = &rest[..end];
        assert!(
            root.join(target).is_file(),
            "README.md links to {target}, which is missing"
        );
        links += 1;
    }
    assert!(links > 0, "the README links to no docs/ file");
}
