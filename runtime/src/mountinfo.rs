//! `/proc/<pid>/mountinfo`, read in one place for the whole tree.
//!
//! A line (proc(5)):
//! ```text
//! 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2) (3)  (4)     (5)         (6)       (7)    (8) (9)   (10)        (11)
//! ```
//! (7) is zero or more optional fields (`shared:N`, `master:N`, `propagate_from:N`,
//! `unbindable`), ended by the separator (8). The kernel escapes a space, tab, newline and
//! backslash in paths as a backslash and three octal digits (`\040`, `\011`, `\012`, `\134`);
//! every other byte of a path is written as it is, so a path is bytes, not UTF-8. A
//! filesystem writes its own super options (11): overlayfs escapes a comma, `=`, whitespace
//! and backslash in its directories the same way, and keeps the backslash escapes the mounter
//! gave (a `:` in a lower directory is written `\:`), so its directories are decoded twice:
//! octal here, then overlayfs's own backslash escapes ([`Mount::overlay_upperdir`],
//! [`Mount::overlay_lowerdirs`]).
//!
//! Why not the `procfs` crate: its mountinfo reads the file as UTF-8 lines (one path with a
//! byte that is not UTF-8 fails the whole table) and keeps the octal escapes in paths and
//! options as they are (eminence/procfs#262), which is the bug this module exists to fix.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One mount of a mountinfo table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// (1) The mount's id.
    pub id: u64,
    /// (2) The parent mount's id.
    pub parent: u64,
    /// (3) `major:minor` of the filesystem's device.
    pub device: String,
    /// (4) The directory of the filesystem mounted here (decoded).
    pub root: PathBuf,
    /// (5) Where it is mounted (decoded).
    pub mount_point: PathBuf,
    /// (6) Per-mount options (`rw,nosuid,...`).
    pub options: String,
    /// (7) Optional fields (`shared:1`, `master:2`, ...), as written.
    pub optional: Vec<String>,
    /// (9) The filesystem type (decoded; `type.subtype` for FUSE).
    pub fs_type: String,
    /// (10) The source (decoded; `none` when there is none).
    pub source: OsString,
    /// (11) Per-superblock options as the filesystem wrote them (escapes not decoded: a value
    /// may hold an escaped comma). See [`Mount::super_option`].
    pub super_options: Vec<u8>,
}

/// A line of mountinfo that is not what the kernel writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line}: {reason}")]
pub struct ParseError {
    /// The line's number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// The mounts of this process's mount namespace (`/proc/self/mountinfo`), in mount order.
pub fn read_self() -> crate::Result<Vec<Mount>> {
    read(Path::new("/proc/self/mountinfo"))
}

/// The mounts of a mountinfo file, in its order.
pub fn read(path: &Path) -> crate::Result<Vec<Mount>> {
    let bytes = std::fs::read(path).map_err(|e| crate::Error::io("read the mount table", path, e))?;
    parse(&bytes).map_err(|e| crate::Error::Invalid {
        what: "mount table",
        reason: format!("{}: {e}", path.display()),
    })
}

/// Parses a mountinfo table (empty lines are skipped).
pub fn parse(text: &[u8]) -> Result<Vec<Mount>, ParseError> {
    text.split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| parse_line(line).map_err(|reason| ParseError { line: i + 1, reason }))
        .collect()
}

fn parse_line(line: &[u8]) -> Result<Mount, String> {
    let mut fields = line.split(|b| *b == b' ');
    let mut next = |what: &str| {
        fields
            .next()
            .filter(|f| !f.is_empty())
            .ok_or_else(|| format!("no {what}"))
    };
    let number = |f: &[u8], what: &str| {
        std::str::from_utf8(f)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{what} {:?} is not a number", String::from_utf8_lossy(f)))
    };
    let id = number(next("mount id")?, "mount id")?;
    let parent = number(next("parent id")?, "parent id")?;
    let device = text(next("device")?, "device")?;
    let root = PathBuf::from(OsString::from_vec(unescape(next("root")?)));
    let mount_point = PathBuf::from(OsString::from_vec(unescape(next("mount point")?)));
    let options = text(next("mount options")?, "mount options")?;
    let mut optional = Vec::new();
    loop {
        let f = next("separator")?;
        if f == b"-" {
            break;
        }
        optional.push(text(f, "optional field")?);
    }
    let fs_type = String::from_utf8_lossy(&unescape(next("filesystem type")?)).into_owned();
    let source = OsString::from_vec(unescape(next("source")?));
    // The rest of the line: a filesystem's options may hold a space it did not escape.
    let rest: Vec<&[u8]> = fields.collect();
    let super_options = rest.join(&b' ');
    Ok(Mount {
        id,
        parent,
        device,
        root,
        mount_point,
        options,
        optional,
        fs_type,
        source,
        super_options,
    })
}

fn text(f: &[u8], what: &str) -> Result<String, String> {
    String::from_utf8(f.to_vec()).map_err(|_| format!("{what} is not text"))
}

/// Decodes the kernel's octal escapes: a backslash and three octal digits (at most `\377`)
/// is that byte; any other byte, a lone backslash included, is itself.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            if let Some(value) = octal(field.get(i + 1..i + 4)) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

fn octal(digits: Option<&[u8]>) -> Option<u8> {
    let digits = digits?;
    if !digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
        return None;
    }
    let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
    u8::try_from(value).ok()
}

/// Removes overlayfs's own escapes (a backslash makes the next byte literal), as overlayfs
/// does to a directory option before it looks the path up.
fn overlay_unescape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut escaped = false;
    for &b in value {
        if b == b'\\' && !escaped {
            escaped = true;
            continue;
        }
        escaped = false;
        out.push(b);
    }
    out
}

fn path(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}

impl Mount {
    /// The per-superblock options, split at commas, names and values decoded: `(name,
    /// value)`, the value `None` for a flag.
    pub fn super_options(&self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.super_options
            .split(|b| *b == b',')
            .filter(|o| !o.is_empty())
            .map(|o| match o.iter().position(|b| *b == b'=') {
                Some(eq) => (unescape(&o[..eq]), Some(unescape(&o[eq + 1..]))),
                None => (unescape(o), None),
            })
            .collect()
    }

    /// The (decoded) value of the last super option named `name`.
    pub fn super_option(&self, name: &str) -> Option<Vec<u8>> {
        self.super_options()
            .into_iter()
            .rev()
            .find(|(n, _)| n == name.as_bytes())
            .and_then(|(_, v)| v)
    }

    /// Whether this is an overlayfs mount.
    pub fn is_overlay(&self) -> bool {
        self.fs_type == "overlay"
    }

    /// An overlay's upper directory (`None`: not an overlay, or a read-only one).
    pub fn overlay_upperdir(&self) -> Option<PathBuf> {
        if !self.is_overlay() {
            return None;
        }
        self.super_option("upperdir").map(|v| path(overlay_unescape(&v)))
    }

    /// An overlay's lower directories, top first: those of `lowerdir=` (separated by `:`,
    /// and `::` before data-only ones), then those added one by one (`lowerdir+=`,
    /// `datadir+=`, which overlayfs takes as they are). Empty when not an overlay.
    pub fn overlay_lowerdirs(&self) -> Vec<PathBuf> {
        if !self.is_overlay() {
            return Vec::new();
        }
        let mut dirs = Vec::new();
        for (name, value) in self.super_options() {
            let Some(value) = value else { continue };
            match name.as_slice() {
                b"lowerdir" => dirs.extend(
                    split_unescaped_colons(&value)
                        .into_iter()
                        .filter(|d| !d.is_empty())
                        .map(|d| path(overlay_unescape(d))),
                ),
                b"lowerdir+" | b"datadir+" => dirs.push(path(value)),
                _ => {}
            }
        }
        dirs
    }
}

/// `value` split at each `:` no backslash escapes.
fn split_unescaped_colons(value: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, &b) in value.iter().enumerate() {
        match b {
            b'\\' if !escaped => escaped = true,
            b':' if !escaped => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
    }
    parts.push(&value[start..]);
    parts
}

/// The mount on top at `mount_point` (the last one mounted there), if any.
pub fn top_at<'a>(mounts: &'a [Mount], mount_point: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mount_point == mount_point)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    const OVERLAY: &[u8] = b"36 35 0:30 / /run/x/rootfs rw,relatime shared:5 master:1 - overlay overlay \
        rw,lowerdir=/l1:/l2,upperdir=/s/9/fs,workdir=/s/9/work\n\
        37 35 0:31 / /other rw - tmpfs tmpfs rw\n";

    #[test]
    fn reads_every_field_and_the_optional_ones() {
        let m = parse(OVERLAY).expect("parse");
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].id, m[0].parent, m[0].device.as_str()), (36, 35, "0:30"));
        assert_eq!(m[0].root, Path::new("/"));
        assert_eq!(m[0].mount_point, Path::new("/run/x/rootfs"));
        assert_eq!(m[0].options, "rw,relatime");
        assert_eq!(m[0].optional, ["shared:5", "master:1"]);
        assert_eq!(
            (m[0].fs_type.as_str(), m[0].source.as_bytes()),
            ("overlay", &b"overlay"[..])
        );
        assert_eq!(m[0].overlay_upperdir(), Some(PathBuf::from("/s/9/fs")));
        assert_eq!(
            m[0].overlay_lowerdirs(),
            [PathBuf::from("/l1"), PathBuf::from("/l2")]
        );
        assert!(m[1].optional.is_empty());
        assert_eq!(m[1].overlay_upperdir(), None, "a tmpfs has no upper directory");
        assert!(m[1].overlay_lowerdirs().is_empty());
        assert_eq!(top_at(&m, Path::new("/other")).map(|m| m.id), Some(37));
        assert_eq!(top_at(&m, Path::new("/nowhere")), None);
    }

    #[test]
    fn decodes_octal_escapes_of_space_tab_newline_and_backslash() {
        assert_eq!(unescape(br"/a\040b\011c\012d\134e"), b"/a b\tc\nd\\e");
        assert_eq!(unescape(br"/plain"), b"/plain");
        // Not an escape: kept as written.
        assert_eq!(unescape(br"/x\"), br"/x\");
        assert_eq!(unescape(br"/x\04"), br"/x\04");
        assert_eq!(unescape(br"/x\089"), br"/x\089");
        assert_eq!(unescape(br"/x\400"), br"/x\400", "above a byte");
        assert_eq!(unescape(br"\\134"), br"\\");
    }

    /// The lines this kernel wrote for overlays mounted under directories named with a space,
    /// a tab, a backslash (given to overlayfs escaped, `\\`), a newline, a colon (`\:`) and
    /// bytes that are not ASCII (`é` in UTF-8, then 0xff, which is no UTF-8).
    #[test]
    fn overlay_directories_with_any_byte_are_found() {
        let mut text = Vec::new();
        text.extend_from_slice(
            b"49 27 0:40 / /tmp/ovt/sp\\040ace/m rw,relatime - overlay overlay rw,lowerdir=/tmp/ovt/sp\\040ace/l1:/tmp/ovt/sp\\040ace/l2,upperdir=/tmp/ovt/sp\\040ace/u,workdir=/tmp/ovt/sp\\040ace/w,uuid=on\n",
        );
        text.extend_from_slice(b"53 27 0:42 / /tmp/ovt/t\\011ab/m rw,relatime - overlay overlay rw,lowerdir=/tmp/ovt/t\\011ab/l1,upperdir=/tmp/ovt/t\\011ab/u,workdir=/tmp/ovt/t\\011ab/w\n");
        text.extend_from_slice(b"57 27 0:44 / /tmp/ovt/\xc3\xa9\xff/m rw,relatime - overlay overlay rw,lowerdir=/tmp/ovt/\xc3\xa9\xff/l1,upperdir=/tmp/ovt/\xc3\xa9\xff/u,workdir=/tmp/ovt/\xc3\xa9\xff/w\n");
        text.extend_from_slice(b"61 27 0:46 / /tmp/ovt/b\\134s/m rw,relatime - overlay overlay rw,lowerdir=/tmp/ovt/b\\134\\134s/l1:/tmp/ovt/b\\134\\134s/l2,upperdir=/tmp/ovt/b\\134\\134s/u,workdir=/tmp/ovt/b\\134\\134s/w,uuid=on\n");
        text.extend_from_slice(b"65 27 0:48 / /tmp/ovt/n\\012l/m rw,relatime - overlay overlay rw,lowerdir=/tmp/ovt/n\\012l/l1,upperdir=/tmp/ovt/n\\012l/u,workdir=/tmp/ovt/n\\012l/w\n");
        text.extend_from_slice(b"69 27 0:50 / /tmp/ovt/c:o/m rw,relatime - overlay overlay rw,lowerdir=/tmp/ovt/c\\134:o/l1:/tmp/ovt/c\\134:o/l2,upperdir=/tmp/ovt/c\\134:o/u,workdir=/tmp/ovt/c\\134:o/w\n");
        let mounts = parse(&text).expect("parse");
        let dirs: [&[u8]; 6] = [
            b"/tmp/ovt/sp ace",
            b"/tmp/ovt/t\tab",
            b"/tmp/ovt/\xc3\xa9\xff",
            b"/tmp/ovt/b\\s",
            b"/tmp/ovt/n\nl",
            b"/tmp/ovt/c:o",
        ];
        for (m, dir) in mounts.iter().zip(dirs) {
            let dir = Path::new(std::ffi::OsStr::from_bytes(dir));
            let found = top_at(&mounts, &dir.join("m")).unwrap_or_else(|| panic!("{dir:?}"));
            assert_eq!(found, m);
            assert_eq!(m.overlay_upperdir(), Some(dir.join("u")), "{dir:?}");
            assert_eq!(m.overlay_lowerdirs()[0], dir.join("l1"), "{dir:?}");
        }
        assert_eq!(
            mounts[5].overlay_lowerdirs(),
            [PathBuf::from("/tmp/ovt/c:o/l1"), PathBuf::from("/tmp/ovt/c:o/l2")]
        );
    }

    #[test]
    fn overlay_layers_added_one_by_one_and_data_only_layers() {
        let line =
            b"1 0 0:1 / /m rw - overlay overlay rw,lowerdir=/a:/b::/data,upperdir=/u\\054x,workdir=/w\n";
        let m = &parse(line).expect("parse")[0];
        assert_eq!(
            m.overlay_upperdir(),
            Some(PathBuf::from("/u,x")),
            "an escaped comma"
        );
        assert_eq!(
            m.overlay_lowerdirs(),
            [PathBuf::from("/a"), PathBuf::from("/b"), PathBuf::from("/data")]
        );
        let line = b"1 0 0:1 / /m ro - overlay overlay ro,lowerdir+=/a\\134b,lowerdir+=/c,datadir+=/d\n";
        let m = &parse(line).expect("parse")[0];
        assert_eq!(m.overlay_upperdir(), None, "a read-only overlay");
        assert_eq!(
            m.overlay_lowerdirs(),
            [PathBuf::from("/a\\b"), PathBuf::from("/c"), PathBuf::from("/d")]
        );
    }

    #[test]
    fn super_options_may_hold_a_raw_space() {
        let m = &parse(b"1 0 0:1 / /m rw - fuse.x src rw,name=a b,c\n").expect("parse")[0];
        assert_eq!(m.fs_type, "fuse.x");
        assert_eq!(m.super_option("name"), Some(b"a b".to_vec()));
        assert_eq!(m.super_options().last(), Some(&(b"c".to_vec(), None)));
    }

    #[test]
    fn malformed_lines_are_errors_that_name_the_line() {
        for bad in [
            &b"x 0 0:1 / /m rw - tmpfs t rw"[..],
            b"1 0 0:1 / /m rw shared:1",
            b"1 0 0:1 / /m rw -",
            b"1 0 0:1 / /m rw - tmpfs",
            b"1 0",
            b"1  0 0:1 / /m rw - tmpfs t rw",
        ] {
            let mut text = b"1 0 0:1 / / rw - ext4 /dev/vda rw\n".to_vec();
            text.extend_from_slice(bad);
            let e = parse(&text).expect_err(&String::from_utf8_lossy(bad));
            assert_eq!(e.line, 2, "{e}");
        }
    }

    #[test]
    fn this_process_mount_table_parses_and_has_a_root() {
        let mounts = read_self().expect("/proc/self/mountinfo");
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
    }
}

/// Property tests: any bytes give a table or an error, never a panic; kernel-shaped lines give
/// their paths back byte for byte. 2000 cases each (`PROPTEST_CASES` overrides).
#[cfg(test)]
mod proptests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn cases(default: u32) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(cases(2000)))]

        /// Random bytes: an error or a table, never a panic.
        #[test]
        fn random_input_never_panics(text in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(mounts) = parse(&text) {
                for m in &mounts {
                    let _ = (m.overlay_upperdir(), m.overlay_lowerdirs(), m.super_options());
                }
            }
        }

        /// Lines shaped like the kernel's, any field made of any bytes (spaces and newlines
        /// escaped as the kernel does): the mount point comes back byte for byte.
        #[test]
        fn escaped_paths_come_back(
            point in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64),
            upper in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64),
            optional in proptest::collection::vec("(shared|master|propagate_from):[0-9]{1,3}", 0..3),
        ) {
            let escape = |bytes: &[u8], also: &[u8]| {
                let mut out = Vec::new();
                for &b in bytes {
                    if b" \t\n\\".contains(&b) || also.contains(&b) {
                        out.extend_from_slice(format!("\\{b:03o}").as_bytes());
                    } else {
                        out.push(b);
                    }
                }
                out
            };
            let mut line = b"7 1 0:9 / ".to_vec();
            line.extend(escape(&point, b""));
            line.extend_from_slice(b" rw");
            for o in &optional {
                line.push(b' ');
                line.extend_from_slice(o.as_bytes());
            }
            line.extend_from_slice(b" - overlay overlay rw,upperdir=");
            // overlayfs's own escape first (a backslash before a backslash), then the octal one.
            let mut ovl = Vec::new();
            for &b in &upper {
                if b == b'\\' {
                    ovl.push(b'\\');
                }
                ovl.push(b);
            }
            line.extend(escape(&ovl, b",="));
            line.extend_from_slice(b",workdir=/w\n");
            let mounts = parse(&line).expect("a kernel-shaped line parses");
            proptest::prop_assert_eq!(mounts.len(), 1);
            proptest::prop_assert_eq!(mounts[0].mount_point.as_os_str().as_bytes(), &point[..]);
            proptest::prop_assert_eq!(&mounts[0].optional, &optional);
            proptest::prop_assert_eq!(mounts[0].overlay_upperdir(), Some(path(upper.clone())));
        }
    }
}
