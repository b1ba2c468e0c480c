//! Keeps user code (builds and services) away from what belongs to the agent and to other
//! users: who that code runs as (`run_as`), and the agent's folders, laid out so that user
//! code can write only where it must.
//!
//! A root agent switches user code to the unprivileged `run_as` user with `setpriv`
//! (util-linux): uid and gid set, supplementary groups cleared and `no_new_privs` set before
//! the program runs, so the code cannot read the environment of the agent's git processes
//! (which holds the user's password), nor write the mirrors git reads.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sdp_protocol::SandboxId;
use tokio::process::Command;

/// Where `setpriv` is looked for when PATH does not have it.
const SETPRIV_FALLBACKS: &[&str] = &["/usr/bin/setpriv", "/bin/setpriv"];

/// The unprivileged user that user code runs as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    setpriv: PathBuf,
}

/// Who runs user code: the `run_as` user, or the agent's own user when there is none (a
/// non-root agent, or a root one with `allow_root_builds`).
#[derive(Debug, Clone, Default)]
pub struct UserCode {
    run_as: Option<RunAs>,
}

impl UserCode {
    /// Applies the policy: a root agent needs `run_as` unless `allow_root_builds`; a non-root
    /// agent cannot switch users, so `run_as` is refused there rather than silently ignored.
    pub fn from_config(run_as: Option<&str>, allow_root_builds: bool) -> Result<UserCode, String> {
        let root = nix::unistd::geteuid().is_root();
        match (run_as, root) {
            (Some(name), true) => Ok(UserCode {
                run_as: Some(RunAs::resolve(name)?),
            }),
            (Some(name), false) => Err(format!(
                "`run_as = \"{name}\"` needs an agent that runs as root, to switch users; this one runs as uid {}. Start the agent as root, or remove `run_as` (builds then run as the agent's own user)",
                nix::unistd::geteuid()
            )),
            (None, true) if !allow_root_builds => Err(
                "the agent runs as root without `run_as`: every user's build and service would run as root, read other users' passwords and the agent token, and change what git runs. Set `run_as` to an unprivileged user (for example `run_as = \"sdp-run\"`), or set `allow_root_builds = true` on a machine only you use".into(),
            ),
            (None, true) => {
                tracing::warn!(
                    "allow_root_builds: builds and services run as root, so any user's code can read other users' passwords and the agent token"
                );
                Ok(UserCode::default())
            }
            (None, false) => Ok(UserCode::default()),
        }
    }

    /// User code runs as a user of its own (`run_as`), not as the agent.
    pub fn is_separate(&self) -> bool {
        self.run_as.is_some()
    }

    /// `(uid, gid)` user code runs as: the `run_as` user's, else the agent's own.
    pub fn owner(&self) -> (u32, u32) {
        match &self.run_as {
            Some(r) => (r.uid, r.gid),
            None => (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        }
    }

    /// `program` run as the `run_as` user when there is one. The caller sets arguments,
    /// environment and working directory as for `program` itself.
    pub fn command(&self, program: &str) -> Command {
        match &self.run_as {
            None => Command::new(program),
            Some(r) => {
                let mut cmd = Command::new(&r.setpriv);
                cmd.arg(format!("--reuid={}", r.uid))
                    .arg(format!("--regid={}", r.gid))
                    .args(["--clear-groups", "--no-new-privs", "--", program]);
                cmd
            }
        }
    }

    /// Kills every process of user code's user whose working directory is in one of `dirs`
    /// (a sandbox's checkouts and home): what its builds left behind, even outside their
    /// process groups (`setsid`), once the sandbox is gone. Returns how many.
    pub fn end_strays(&self, dirs: &[PathBuf]) -> usize {
        let (uid, _) = self.owner();
        let own = std::process::id();
        let mut ended = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if u32::try_from(pid).is_ok_and(|p| p == own)
                || entry.metadata().map_or(true, |m| m.uid() != uid)
            {
                continue;
            }
            let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
                continue;
            };
            if dirs.iter().any(|dir| cwd.starts_with(dir))
                && nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok()
            {
                ended += 1;
            }
        }
        ended
    }

    /// Gives `path` (not what it points to) to the `run_as` user, so that user code can write
    /// in it; nothing to do without one.
    pub fn own(&self, path: &Path) -> std::io::Result<()> {
        match &self.run_as {
            Some(r) => std::os::unix::fs::lchown(path, Some(r.uid), Some(r.gid)),
            None => Ok(()),
        }
    }

    /// Creates `path` for user code to write in: owned by the `run_as` user, mode 0700.
    pub fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(path)?;
        self.own(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
    }

    /// Fails with a message naming the folder when the `run_as` user cannot reach `dir` (a
    /// parent that others may not search, such as a 0700 home directory), or could replace it
    /// or a folder above it (one it owns, or may write in without the sticky bit): user code
    /// could then swap the agent's folders for its own.
    pub fn check_surroundings(&self, dir: &Path) -> Result<(), String> {
        let Some(r) = &self.run_as else {
            return Ok(());
        };
        for ancestor in dir.ancestors().skip(1) {
            if let Ok(link) = std::fs::symlink_metadata(ancestor) {
                let mode = link.permissions().mode();
                let writable = link.uid() == r.uid
                    || (link.is_dir()
                        && mode & 0o1000 == 0
                        && (mode & 0o002 != 0 || (link.gid() == r.gid && mode & 0o020 != 0)));
                if writable {
                    return Err(format!(
                        "`run_as` user {user} could replace work_dir {dir}: it owns or may write in {folder}. Choose a work_dir whose every folder above belongs to root and is writable by no one else",
                        user = r.name,
                        dir = dir.display(),
                        folder = ancestor.display()
                    ));
                }
            }
            let Ok(meta) = std::fs::metadata(ancestor) else {
                continue;
            };
            let mode = meta.permissions().mode();
            let searchable = if meta.uid() == r.uid {
                mode & 0o100 != 0
            } else if meta.gid() == r.gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !searchable {
                return Err(format!(
                    "`run_as` user {user} cannot reach work_dir {dir}: {folder} is not searchable by it (chmod o+x {folder}, or choose another work_dir)",
                    user = r.name,
                    dir = dir.display(),
                    folder = ancestor.display()
                ));
            }
        }
        Ok(())
    }

    /// Fails when `path` exists but is not a folder of the agent's own: a link, or something
    /// another user (user code, an earlier agent of another user) made and may have filled.
    fn check_agents_own(&self, path: &Path) -> Result<(), String> {
        if self.run_as.is_none() {
            return Ok(());
        }
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return Ok(());
        };
        let agent = nix::unistd::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != agent {
            return Err(format!(
                "{} is not a folder of the agent's own (uid {}): user code may have made or changed it. Remove it, or make it root's after checking what it holds",
                path.display(),
                meta.uid()
            ));
        }
        Ok(())
    }
}

impl RunAs {
    fn resolve(name: &str) -> Result<RunAs, String> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("cannot look up the `run_as` user {name:?}: {e}"))?
            .ok_or_else(|| {
                format!(
                    "the `run_as` user {name:?} does not exist: create it (for example `useradd --system --no-create-home --shell /usr/sbin/nologin {name}`)"
                )
            })?;
        if user.uid.is_root() || user.gid.as_raw() == 0 {
            return Err(format!(
                "the `run_as` user {name:?} has uid or gid 0: it must be an unprivileged user"
            ));
        }
        let setpriv = find_program("setpriv", SETPRIV_FALLBACKS).ok_or_else(|| {
            "`run_as` needs setpriv (from util-linux) to switch users, and it is not installed"
                .to_owned()
        })?;
        Ok(RunAs {
            name: name.to_owned(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            setpriv,
        })
    }
}

fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let from_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// The agent's folders under `work_dir`. Everything of a sandbox is under its id, never its
/// name (a name can be reused the moment its sandbox has ended, and a checkout with its build
/// marker must never pass to another sandbox). Only `checkouts/<sandbox_id>/<service>`,
/// `homes/<sandbox_id>` and `cache` are user code's; git's home and mirrors, pid files and build markers are the
/// agent's alone (mode 0700), so user code can neither plant config or hooks where git reads
/// them nor fake what the agent records.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    /// git's `HOME` (empty: no global config is read anyway).
    pub git_home: PathBuf,
    /// One bare mirror per repository.
    pub mirrors: PathBuf,
    /// Pid files of the process runtime, `run/<sandbox_id>/<service>.pid.json`.
    pub run: PathBuf,
    /// What the agent records per sandbox: the commit each service was built at,
    /// `state/<sandbox_id>/<service>.built`.
    pub state: PathBuf,
    /// The working trees, one per sandbox and service, with no `.git`.
    pub checkouts: PathBuf,
    /// `HOME` of each sandbox's builds and services.
    pub homes: PathBuf,
    /// Build caches (Go's), shared by every sandbox's builds.
    pub cache: PathBuf,
    /// Finished builds shared between sandboxes, the agent's alone
    /// ([`crate::shared_builds`]).
    pub builds: PathBuf,
}

impl Layout {
    /// `work_dir` made absolute against the current directory: Docker bind mounts and the Go
    /// caches need absolute paths, and nothing later may depend on the current directory.
    pub fn new(work_dir: &Path) -> std::io::Result<Layout> {
        let root = std::path::absolute(work_dir)?;
        Ok(Layout {
            git_home: root.join("git").join("home"),
            mirrors: root.join("git").join("mirrors"),
            run: root.join("run"),
            state: root.join("state"),
            checkouts: root.join("checkouts"),
            homes: root.join("homes"),
            cache: root.join("cache"),
            builds: root.join("builds"),
            root,
        })
    }

    /// Creates the folders with their owners and modes (also fixing those of an older
    /// layout's folders).
    pub fn prepare(&self, users: &UserCode) -> Result<(), String> {
        let io = |path: &Path, e: std::io::Error| format!("cannot prepare {}: {e}", path.display());
        let make = |path: &Path, mode: u32| -> Result<(), String> {
            users.check_agents_own(path)?;
            std::fs::create_dir_all(path).map_err(|e| io(path, e))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io(path, e))
        };
        let private = |path: &Path| make(path, 0o700);
        // Searchable but not listable by others: user code reaches its own folders by name.
        let passage = |path: &Path| make(path, 0o711);
        users.check_surroundings(&self.root)?;
        passage(&self.root)?;
        private(&self.root.join("git"))?;
        for dir in [&self.git_home, &self.mirrors, &self.run, &self.state] {
            private(dir)?;
        }
        passage(&self.checkouts)?;
        passage(&self.homes)?;
        users
            .create_dir(&self.cache)
            .map_err(|e| io(&self.cache, e))
    }

    pub fn checkouts_of(&self, sandbox: &SandboxId) -> PathBuf {
        self.checkouts.join(sandbox.as_str())
    }

    pub fn home_of(&self, sandbox: &SandboxId) -> PathBuf {
        self.homes.join(sandbox.as_str())
    }

    pub fn state_of(&self, sandbox: &SandboxId) -> PathBuf {
        self.state.join(sandbox.as_str())
    }

    /// Every folder of `sandbox`: its checkouts, home and state.
    pub fn folders_of(&self, sandbox: &SandboxId) -> [PathBuf; 3] {
        [
            self.checkouts_of(sandbox),
            self.home_of(sandbox),
            self.state_of(sandbox),
        ]
    }

    /// The sandboxes with a folder here (checkouts, home or state): after a sandbox was
    /// deleted while the agent was away, what it left until the control plane tears it down.
    pub fn sandboxes(&self) -> Vec<SandboxId> {
        let mut ids: Vec<SandboxId> = [&self.checkouts, &self.homes, &self.state]
            .into_iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str().map(SandboxId::parse)?.ok())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_work_dir_becomes_absolute() {
        let layout = Layout::new(Path::new("./x/../agent")).unwrap();
        assert!(layout.root.is_absolute());
        assert!(layout.mirrors.starts_with(&layout.root));
    }

    fn id(n: u64) -> SandboxId {
        SandboxId::parse(format!("sbx_{n:016x}")).unwrap()
    }

    #[test]
    fn every_folder_of_a_sandbox_is_under_its_id() {
        let layout = Layout::new(Path::new("/srv/sdp")).unwrap();
        let a = id(0xa);
        for dir in layout.folders_of(&a) {
            assert_eq!(dir.file_name().unwrap(), "sbx_000000000000000a");
        }
        assert_ne!(layout.checkouts_of(&a), layout.checkouts_of(&id(0xb)));
    }

    #[test]
    fn the_sandboxes_with_a_folder_are_found_and_other_entries_ignored() {
        let work = tempfile::tempdir().unwrap();
        let layout = Layout::new(work.path()).unwrap();
        layout.prepare(&UserCode::default()).unwrap();
        assert!(layout.sandboxes().is_empty());
        std::fs::create_dir_all(layout.checkouts_of(&id(3)).join("orders")).unwrap();
        std::fs::create_dir_all(layout.home_of(&id(1))).unwrap();
        std::fs::create_dir_all(layout.state_of(&id(2))).unwrap();
        std::fs::create_dir_all(layout.state_of(&id(3))).unwrap();
        // A folder of an older layout, keyed by a sandbox's name, is no sandbox id.
        std::fs::create_dir_all(layout.checkouts.join("pay-42")).unwrap();
        assert_eq!(layout.sandboxes(), [id(1), id(2), id(3)]);
    }
}
