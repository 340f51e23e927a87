//! The crate's layers (see lib.rs), checked: no module of a layer names a module of a higher
//! one, or a sibling of the same rank. Read from the source files; comments and test code
//! (a `#[cfg(test)]` module to the end of its file, `tests.rs`, `proptests.rs`) are not
//! checked.

use std::path::{Path, PathBuf};

/// Each top-level module and its rank, lowest first.
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
];

fn rank(module: &str) -> Option<u32> {
    RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// The upward names in `text`, the source of a file of top-level module `own`: (line, name).
fn upward(own: &str, text: &str) -> Vec<(usize, String)> {
    let Some(mine) = rank(own) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let next = lines.get(n + 1).map_or("", |l| l.trim_start());
        if code.starts_with("#[cfg(test)]") && next.split_whitespace().any(|w| w == "mod") {
            break; // the test module, to the end of the file
        }
        if code.starts_with("//") {
            continue;
        }
        for (at, _) in line.match_indices("crate::") {
            let name: String = line[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let Some(theirs) = rank(&name) else { continue };
            if theirs > mine || (theirs == mine && name != own) {
                out.push((n + 1, name));
            }
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("list the sources").flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_names_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("inside src");
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if matches!(name, "tests.rs" | "proptests.rs") {
            continue;
        }
        let own = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_owned();
        let text = std::fs::read_to_string(&file).expect("read a source");
        for (line, name) in upward(&own, &text) {
            found.push(format!("{}:{line} ({own}) names {name}", rel.display()));
        }
    }
    assert!(found.is_empty(), "upward imports:\n{}", found.join("\n"));
    assert!(rank("pod").is_some() && rank("fs").is_some());
}

#[test]
fn an_upward_import_is_found_and_comments_and_tests_are_not() {
    let planted = "use crate::error::Result;\nuse crate::pod::dump::PodDump;\n";
    assert_eq!(upward("fs", planted), [(2, "pod".to_owned())]);
    assert_eq!(
        upward("criu", "use crate::archive::rootfs;\n"),
        [(1, "archive".to_owned())]
    );
    let ignored = "// see crate::pod::dump\n#[cfg(test)]\nmod tests { use crate::pod::dump; }\n";
    assert!(upward("fs", ignored).is_empty());
    let test_helper = "#[cfg(test)]\nfn none() {}\nuse crate::node::store;\n";
    assert_eq!(
        upward("fs", test_helper),
        [(3, "node".to_owned())],
        "only a test module ends it"
    );
    assert!(upward("pod", "use crate::fs::private;\nuse crate::pod::target;\n").is_empty());
}
