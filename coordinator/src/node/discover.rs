//! Finding containerd's configuration on a host and reading what the installer needs from it.
//!
//! Where (the first that exists, unless `--containerd-config` names one):
//! - RKE2: `/var/lib/rancher/rke2/agent/etc/containerd/`, k3s:
//!   `/var/lib/rancher/k3s/agent/etc/containerd/`. Both regenerate `config.toml` at every start
//!   from a Go template, so the installer edits the template: `config-v3.toml.tmpl` (containerd
//!   2.x) or `config.toml.tmpl`, creating `config-v3.toml.tmpl` as `{{ template "base" . }}` when
//!   neither exists. A template is not TOML: the runtime is appended to it as a marked block.
//! - `/etc/containerd/config.toml` (created as `version = 3` plus the import when missing:
//!   containerd reads no drop-in without a main file that imports it).
//!
//! containerd's semantics the installer relies on (read in containerd's
//! `cmd/containerd/server/config`): only the main file's `imports` (and the imports of the files
//! it imports) are read: relative entries are relative to the importing file's directory, `*`
//! globs are expanded; 2.2 and later put `/etc/containerd/conf.d/*.toml` in the file `containerd
//! config default` prints, but a config without that line reads no `conf.d`. Imported files are
//! merged into the main one (plugin tables key by key; arrays inside a plugin replaced). The
//! configuration is migrated *once*, after merging, from the merged `version` (the last
//! non-zero one read): a drop-in of another version than the main file would change how the
//! main file is read, so the drop-in always carries the main file's version. Version 1 (or no
//! `version` key) was removed in containerd 2.0 and is refused.

use std::path::{Path, PathBuf};

use super::host_root::HostRoot;
use super::Error;

/// The standard containerd configuration.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// containerd's standard CRI socket.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Where the runtime goes when the configuration imports no drop-in directory.
pub const OWN_DROP_IN: &str = "/etc/podsnap/containerd.toml";
/// The drop-in's name inside an imported directory.
pub const DROP_IN_NAME: &str = "podsnap.toml";

/// Which containerd distribution runs on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// containerd run by its own unit (`containerd.service`).
    Containerd,
    /// k3s's embedded containerd (templates, `k3s.service` or `k3s-agent.service`).
    K3s,
    /// RKE2's (`rke2-server.service` or `rke2-agent.service`).
    Rke2,
}

impl Flavor {
    /// The systemd units that run containerd, most likely first.
    pub fn units(self) -> &'static [&'static str] {
        match self {
            Flavor::Containerd => &["containerd.service"],
            Flavor::K3s => &["k3s.service", "k3s-agent.service"],
            Flavor::Rke2 => &["rke2-server.service", "rke2-agent.service"],
        }
    }

    /// The CRI socket containerd listens on unless the configuration says otherwise.
    pub fn default_socket(self) -> &'static str {
        match self {
            Flavor::Containerd => CONTAINERD_SOCKET,
            Flavor::K3s | Flavor::Rke2 => "/run/k3s/containerd/containerd.sock",
        }
    }
}

/// The containerd configuration of a host, as found.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    /// The file the installer edits (host path): `config.toml`, or a k3s/RKE2 template.
    pub path: PathBuf,
    /// Its distribution.
    pub flavor: Flavor,
    /// A Go template of k3s/RKE2 rather than TOML.
    pub template: bool,
    /// Its bytes; `None` when it does not exist.
    pub original: Option<Vec<u8>>,
    /// Its `version`: 2 or 3.
    pub version: i64,
    /// Its `imports`, as written.
    pub imports: Vec<String>,
    /// `SystemdCgroup` of the default runc runtime's options, where a file sets it.
    pub systemd_cgroup: Option<bool>,
    /// The gRPC (CRI) socket, a host path.
    pub socket: PathBuf,
}

impl ContainerdConfig {
    /// The CRI plugin's table name for this configuration's version.
    pub fn cri_plugin(&self) -> &'static str {
        cri_plugin(self.version)
    }

    /// Where the drop-in goes, and whether an `imports` entry must be added for it: inside a
    /// directory the configuration imports with a glob that matches `podsnap.toml`, else
    /// [`OWN_DROP_IN`] (already imported by an earlier install, or to be).
    pub fn drop_in_place(&self) -> (PathBuf, Option<String>) {
        if self.template {
            return (self.path.clone(), None);
        }
        let base = self.path.parent().unwrap_or(Path::new("/"));
        for entry in &self.imports {
            let resolved = resolve_import(base, entry);
            if resolved == Path::new(OWN_DROP_IN) {
                return (resolved, None);
            }
            let (Some(dir), Some(pattern)) = (resolved.parent(), resolved.file_name()) else {
                continue;
            };
            let dir_has_glob = dir.to_string_lossy().contains(['*', '?', '[']);
            if !dir_has_glob && glob_match(&pattern.to_string_lossy(), DROP_IN_NAME) {
                return (dir.join(DROP_IN_NAME), None);
            }
        }
        (PathBuf::from(OWN_DROP_IN), Some(OWN_DROP_IN.to_owned()))
    }
}

/// `io.containerd.cri.v1.runtime` (version 3) or `io.containerd.grpc.v1.cri` (version 2).
pub fn cri_plugin(version: i64) -> &'static str {
    if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    }
}

/// An `imports` entry as containerd resolves it: relative to the importing file's directory.
pub fn resolve_import(base: &Path, entry: &str) -> PathBuf {
    let path = Path::new(entry);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    // filepath.Clean: `.` and `..` are folded.
    let mut clean = PathBuf::from("/");
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                clean.pop();
            }
            std::path::Component::Normal(n) => clean.push(n),
            _ => {}
        }
    }
    clean
}

/// Go's `filepath.Match` for one path component, for `*` and `?` (a pattern with a character
/// class never matches here: the installer then adds its own import, which is always right).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if pattern.contains(['[', '\\']) {
        return false;
    }
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// k3s/RKE2 configuration directories, RKE2 first.
const RANCHER_DIRS: [(&str, Flavor); 2] = [
    ("/var/lib/rancher/rke2/agent/etc/containerd", Flavor::Rke2),
    ("/var/lib/rancher/k3s/agent/etc/containerd", Flavor::K3s),
];

/// Finds and reads the host's containerd configuration (`explicit`: `--containerd-config`).
pub fn discover(host: &HostRoot, explicit: Option<&Path>) -> Result<ContainerdConfig, Error> {
    let (path, flavor) = match explicit {
        Some(path) => {
            let flavor = RANCHER_DIRS
                .iter()
                .find(|(dir, _)| path.starts_with(dir))
                .map(|(_, f)| *f)
                .unwrap_or(Flavor::Containerd);
            (path.to_path_buf(), flavor)
        }
        None => find(host),
    };
    read(host, &path, flavor)
}

fn find(host: &HostRoot) -> (PathBuf, Flavor) {
    for (dir, flavor) in RANCHER_DIRS {
        if !host.exists(Path::new(dir)) {
            continue;
        }
        for name in ["config-v3.toml.tmpl", "config.toml.tmpl"] {
            let template = Path::new(dir).join(name);
            if host.exists(&template) {
                return (template, flavor);
            }
        }
        return (Path::new(dir).join("config-v3.toml.tmpl"), flavor);
    }
    (PathBuf::from(CONTAINERD_CONFIG), Flavor::Containerd)
}

/// Reads the configuration at `path`.
pub fn read(host: &HostRoot, path: &Path, flavor: Flavor) -> Result<ContainerdConfig, Error> {
    let original = host
        .read(path)
        .map_err(Error::io("reading containerd's configuration", path))?;
    let template = path.extension().is_some_and(|e| e == "tmpl");
    if template {
        // k3s/RKE2 render config-v3.toml.tmpl as version 3, config.toml.tmpl as version 2 (their
        // containerd 1.7 era); the socket is theirs.
        let version = if path.to_string_lossy().ends_with("config-v3.toml.tmpl") {
            3
        } else {
            2
        };
        return Ok(ContainerdConfig {
            path: path.to_path_buf(),
            flavor,
            template,
            original,
            version,
            imports: Vec::new(),
            systemd_cgroup: None,
            socket: PathBuf::from(flavor.default_socket()),
        });
    }
    let Some(bytes) = &original else {
        // containerd runs on its defaults: a new main file of the current version imports the
        // drop-in.
        return Ok(ContainerdConfig {
            path: path.to_path_buf(),
            flavor,
            template,
            original,
            version: 3,
            imports: Vec::new(),
            systemd_cgroup: None,
            socket: PathBuf::from(flavor.default_socket()),
        });
    };
    let doc = parse(path, bytes)?;
    let version = match doc.get("version") {
        Some(v) => v.as_integer().ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            reason: "`version` is not an integer".to_owned(),
        })?,
        None => 1,
    };
    if !(2..=3).contains(&version) {
        return Err(Error::Config {
            path: path.to_path_buf(),
            reason: format!(
                "configuration version {version}{} is not supported: podsnap installs into \
                 version 2 and 3 configurations (containerd 2.x); migrate it with `containerd \
                 config migrate`",
                if doc.get("version").is_none() {
                    " (no `version` key)"
                } else {
                    ""
                }
            ),
        });
    }
    let imports = match doc.get("imports") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .map(|a| a.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect())
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                reason: "`imports` is not an array of strings".to_owned(),
            })?,
    };
    let socket = doc
        .get("grpc")
        .and_then(|g| g.get("address"))
        .and_then(|a| a.as_str())
        .filter(|a| !a.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(flavor.default_socket()));
    let mut config = ContainerdConfig {
        path: path.to_path_buf(),
        flavor,
        template,
        original,
        version,
        imports,
        systemd_cgroup: None,
        socket,
    };
    config.systemd_cgroup = runc_systemd_cgroup(host, &config, &doc);
    Ok(config)
}

/// Parses TOML text, naming the file in the error.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<toml::Table, Error> {
    let text = std::str::from_utf8(bytes).map_err(|_| Error::Config {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".to_owned(),
    })?;
    text.parse::<toml::Table>().map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: format!("not valid TOML: {}", e.message()),
    })
}

/// `SystemdCgroup` of the default runtime (`default_runtime_name`, else `runc`): the main file
/// first, then its imports in order (a later file wins, as containerd merges them); our own
/// drop-in is not read.
fn runc_systemd_cgroup(host: &HostRoot, config: &ContainerdConfig, main: &toml::Table) -> Option<bool> {
    let plugin = config.cri_plugin();
    let mut files = vec![main.clone()];
    let base = config.path.parent().unwrap_or(Path::new("/"));
    let (own, _) = config.drop_in_place();
    for entry in &config.imports {
        let resolved = resolve_import(base, entry);
        let paths = match (resolved.parent(), resolved.file_name()) {
            (Some(dir), Some(pattern)) if pattern.to_string_lossy().contains(['*', '?']) => host
                .list(dir)
                .unwrap_or_default()
                .into_iter()
                .filter(|n| glob_match(&pattern.to_string_lossy(), n))
                .map(|n| dir.join(n))
                .collect(),
            _ => vec![resolved],
        };
        for path in paths.into_iter().filter(|p| *p != own) {
            if let Ok(Some(bytes)) = host.read(&path) {
                if let Ok(table) = parse(&path, &bytes) {
                    files.push(table);
                }
            }
        }
    }
    let runtimes = |t: &toml::Table| -> Option<toml::Table> {
        t.get("plugins")?
            .get(plugin)?
            .get("containerd")?
            .as_table()
            .cloned()
    };
    let mut default_name = "runc".to_owned();
    for file in &files {
        if let Some(name) = runtimes(file).and_then(|c| {
            c.get("default_runtime_name")
                .and_then(|n| n.as_str().map(str::to_owned))
        }) {
            default_name = name;
        }
    }
    let mut found = None;
    for file in &files {
        if let Some(value) = runtimes(file)
            .and_then(|c| {
                c.get("runtimes")?
                    .get(&default_name)?
                    .get("options")?
                    .get("SystemdCgroup")
                    .cloned()
            })
            .and_then(|v| v.as_bool())
        {
            found = Some(value);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_with(files: &[(&str, &str)]) -> (tempfile::TempDir, HostRoot) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, text) in files {
            let full = dir.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            std::fs::write(full, text).expect("write");
        }
        let host = HostRoot::open(dir.path()).expect("open");
        (dir, host)
    }

    #[test]
    fn versions_one_and_unknown_are_refused() {
        for (text, needle) in [
            ("root = '/var/lib/containerd'\n", "version 1 (no `version` key)"),
            ("version = 1\n", "version 1 is not"),
            ("version = 4\n", "version 4 is not"),
            ("version = 3\n[plugins\n", "not valid TOML"),
        ] {
            let (_dir, host) = host_with(&[(CONTAINERD_CONFIG, text)]);
            let err = discover(&host, None).expect_err(text).to_string();
            assert!(err.contains(needle), "{err}");
            assert!(err.contains(CONTAINERD_CONFIG), "{err}");
        }
    }

    #[test]
    fn drop_in_goes_where_the_config_already_imports() {
        let (_dir, host) = host_with(&[(
            CONTAINERD_CONFIG,
            "version = 3\nimports = ['/etc/containerd/conf.d/*.toml']\n",
        )]);
        let config = discover(&host, None).expect("read");
        assert_eq!(config.version, 3);
        assert_eq!(
            config.drop_in_place(),
            (PathBuf::from("/etc/containerd/conf.d/podsnap.toml"), None)
        );
        // Relative to the config's directory, as containerd resolves it.
        let (_dir, host) = host_with(&[(CONTAINERD_CONFIG, "version = 2\nimports = ['conf.d/*.toml']\n")]);
        let config = discover(&host, None).expect("read");
        assert_eq!(config.cri_plugin(), "io.containerd.grpc.v1.cri");
        assert_eq!(
            config.drop_in_place().0,
            PathBuf::from("/etc/containerd/conf.d/podsnap.toml")
        );
        // A glob that does not match podsnap.toml, or no imports: our own file, imported.
        for text in [
            "version = 3\nimports = ['/etc/containerd/conf.d/*.conf']\n",
            "version = 3\n",
        ] {
            let (_dir, host) = host_with(&[(CONTAINERD_CONFIG, text)]);
            let config = discover(&host, None).expect("read");
            assert_eq!(
                config.drop_in_place(),
                (PathBuf::from(OWN_DROP_IN), Some(OWN_DROP_IN.to_owned()))
            );
        }
        // Already imported by an earlier install.
        let (_dir, host) = host_with(&[(
            CONTAINERD_CONFIG,
            "version = 3\nimports = ['/etc/podsnap/containerd.toml']\n",
        )]);
        assert_eq!(
            discover(&host, None).expect("read").drop_in_place(),
            (PathBuf::from(OWN_DROP_IN), None)
        );
    }

    #[test]
    fn systemd_cgroup_follows_the_default_runtime_across_imports() {
        let (_dir, host) = host_with(&[
            (
                CONTAINERD_CONFIG,
                "version = 3\nimports = ['conf.d/*.toml']\n\
                 [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n\
                 SystemdCgroup = false\n",
            ),
            (
                "/etc/containerd/conf.d/10-systemd.toml",
                "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n\
                 SystemdCgroup = true\n",
            ),
        ]);
        assert_eq!(discover(&host, None).expect("read").systemd_cgroup, Some(true));
        let (_dir, host) = host_with(&[(
            CONTAINERD_CONFIG,
            "version = 2\n[grpc]\naddress = '/run/x.sock'\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = 'crun'\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.crun.options]\nSystemdCgroup = true\n",
        )]);
        let config = discover(&host, None).expect("read");
        assert_eq!(config.systemd_cgroup, Some(true));
        assert_eq!(config.socket, PathBuf::from("/run/x.sock"));
    }

    #[test]
    fn k3s_templates_and_a_missing_config() {
        let (_dir, host) = host_with(&[("/var/lib/rancher/k3s/agent/etc/containerd/config.toml", "x")]);
        let config = discover(&host, None).expect("read");
        assert_eq!(config.flavor, Flavor::K3s);
        assert!(config.template);
        assert_eq!(
            config.path,
            PathBuf::from("/var/lib/rancher/k3s/agent/etc/containerd/config-v3.toml.tmpl")
        );
        assert_eq!(
            config.socket,
            PathBuf::from("/run/k3s/containerd/containerd.sock")
        );
        let (_dir, host) = host_with(&[]);
        let config = discover(&host, None).expect("read");
        assert_eq!(config.original, None);
        assert_eq!(config.version, 3);
        assert_eq!(config.flavor, Flavor::Containerd);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.toml", "podsnap.toml"));
        assert!(glob_match("p?dsnap.toml", "podsnap.toml"));
        assert!(glob_match("*", "podsnap.toml"));
        assert!(!glob_match("*.conf", "podsnap.toml"));
        assert!(!glob_match("[a-z]*.toml", "podsnap.toml"));
        assert_eq!(
            resolve_import(Path::new("/etc/containerd"), "../podsnap/./x.toml"),
            PathBuf::from("/etc/podsnap/x.toml")
        );
    }
}
