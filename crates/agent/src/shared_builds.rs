//! Builds shared between sandboxes: once one sandbox has built a commit, another sandbox of
//! the same repository, commit, build command and runtime gets a copy of that build instead of
//! building again.
//!
//! What keeps it safe, with user code hostile:
//! - **Only after the user's own fetch.** A build is looked up by the commit the deploying
//!   user's fetch (with their own credentials) just resolved, so nobody gets a build of a
//!   commit they could not fetch. The key is a digest: it says nothing of the repository.
//! - **Read-only once made.** A finished build is copied into `builds/<key>`, a folder of the
//!   agent's alone (mode 0700, root's): user code cannot read, change or replace it. Each
//!   sandbox gets its own copy, unpacked by `tar` run as `run_as` into its checkout (what
//!   `git archive` does for a fresh checkout), so what one sandbox does to its files never
//!   reaches the shared build or another sandbox.
//! - **Copied without following anything.** The build to share lies in a checkout user code
//!   owns; the agent (root) reads it through file descriptors, one component at a time, with
//!   `O_NOFOLLOW`: a link planted there (even swapped in mid-copy) is copied as a link, never
//!   followed, and anything but files, folders and links is left out. The copy is bounded in
//!   files, bytes and depth; past a bound the build is simply not shared.
//!
//! Sharing needs `run_as`: an agent whose user code runs as itself could not keep a shared
//! build from that code, so it builds every sandbox itself.

use std::ffi::CStr;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use sha2::{Digest, Sha256};

use crate::isolation::UserCode;
use crate::unpack::{self, UnpackError};

/// The shared builds kept; the least recently used goes first.
const KEPT: usize = 32;
/// A build with more files than this is not shared.
const MAX_FILES: u64 = 200_000;
/// Nor one of more bytes.
const MAX_BYTES: u64 = 4 << 30;
/// Nor one nested deeper.
const MAX_DEPTH: usize = 64;

/// What a shared build is the build of: repository, commit, build command and runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildKey(String);

impl BuildKey {
    pub fn new(repo: &str, commit: &str, build: &str, runtime: &str) -> Self {
        let mut digest = Sha256::new();
        // Each part with its length: no two different sets of parts give the same bytes.
        for part in [repo, commit, build, runtime] {
            digest.update((part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
        Self(
            digest
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The agent's store of shared builds, `builds/` in its work directory.
#[derive(Debug)]
pub struct SharedBuilds {
    root: PathBuf,
}

impl SharedBuilds {
    /// The store in `root`, a folder of the agent's alone (created, mode 0700). What an
    /// earlier run left half copied is removed.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(root)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The shared build of `key`, if one was made; marked as used.
    pub fn get(&self, key: &BuildKey) -> Option<PathBuf> {
        let dir = self.root.join(key.as_str());
        let file = std::fs::File::open(&dir).ok()?;
        if !file.metadata().ok()?.is_dir() {
            return None;
        }
        let _ = file.set_modified(SystemTime::now());
        Some(dir)
    }

    /// Writes a copy of the shared build `dir` (from [`SharedBuilds::get`]) into the empty
    /// folder `checkout`, as user code's user: the sandbox's own files from then on.
    pub async fn copy_to(
        &self,
        dir: &Path,
        checkout: &Path,
        users: &UserCode,
        timeout: Duration,
    ) -> Result<(), String> {
        let mut tar = tokio::process::Command::new("tar");
        tar.arg("-C")
            .arg(dir)
            .args(["-c", "-f", "-", "."])
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("LC_ALL", "C");
        unpack::into_folder(tar, checkout, users, timeout)
            .await
            .map_err(|e| match e {
                UnpackError::TimedOut => format!("not copied within {}s", timeout.as_secs()),
                e => e.to_string(),
            })
    }

    /// Copies the build in `checkout` (user code's) into the store as `key`. A key already
    /// there is kept as it is.
    pub async fn publish(&self, key: &BuildKey, checkout: &Path) -> Result<(), String> {
        let root = self.root.clone();
        let key = key.clone();
        let checkout = checkout.to_owned();
        tokio::task::spawn_blocking(move || publish(&root, &key, &checkout))
            .await
            .map_err(|e| format!("the copy stopped: {e}"))?
    }
}

fn publish(root: &Path, key: &BuildKey, checkout: &Path) -> Result<(), String> {
    let done = root.join(key.as_str());
    if done.is_dir() {
        return Ok(());
    }
    let temp = root.join(format!(".{}-{:016x}", key.as_str(), rand::random::<u64>()));
    let copied = copy_checkout(checkout, &temp);
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&temp, &done) {
        let _ = std::fs::remove_dir_all(&temp);
        // Another deployment of the same build got there first: its copy is as good.
        if done.is_dir() {
            return Ok(());
        }
        return Err(format!("cannot keep the copy: {e}"));
    }
    evict(root);
    Ok(())
}

/// Removes the least recently used builds past [`KEPT`].
fn evict(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut builds: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if builds.len() <= KEPT {
        return;
    }
    builds.sort();
    for (_, dir) in &builds[..builds.len() - KEPT] {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an old shared build");
        }
    }
}

/// How much a copy may still take.
struct Budget {
    files: u64,
    bytes: u64,
}

fn copy_checkout(checkout: &Path, to: &Path) -> Result<(), String> {
    let top = rustix::fs::openat(
        rustix::fs::CWD,
        checkout,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open {}: {e}", checkout.display()))?;
    std::fs::create_dir(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let mut budget = Budget {
        files: MAX_FILES,
        bytes: MAX_BYTES,
    };
    copy_dir(&top, to, 0, &mut budget)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot set the mode of {}: {e}", to.display()))
}

/// Copies what folder `dir` (an open descriptor) holds into `to`, which exists.
fn copy_dir(dir: &OwnedFd, to: &Path, depth: usize, budget: &mut Budget) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("folders nest deeper than {MAX_DEPTH}"));
    }
    let entries = rustix::fs::Dir::read_from(dir).map_err(|e| format!("cannot list: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list: {e}"))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        budget.files = budget
            .files
            .checked_sub(1)
            .ok_or(format!("more than {MAX_FILES} files"))?;
        let dest = to.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        copy_entry(dir, name, &dest, depth, budget)?;
    }
    Ok(())
}

fn copy_entry(
    dir: &OwnedFd,
    name: &CStr,
    dest: &Path,
    depth: usize,
    budget: &mut Budget,
) -> Result<(), String> {
    let what = |e: rustix::io::Errno| format!("cannot copy {}: {e}", dest.display());
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(what)?;
    let mode = stat.st_mode & 0o777;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => {
            let sub = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(what)?;
            std::fs::create_dir(dest)
                .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
            copy_dir(&sub, dest, depth + 1, budget)?;
            // Set last: a folder without write permission could not have been filled.
            std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot set the mode of {}: {e}", dest.display()))
        }
        FileType::RegularFile => {
            // NONBLOCK: a file swapped for a FIFO after the `statat` would block the open.
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(what)?;
            let stat = rustix::fs::fstat(fd.as_fd()).map_err(what)?;
            if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                return Err(format!("{} changed while it was copied", dest.display()));
            }
            let mut from = std::fs::File::from(fd);
            let mut file = std::fs::File::create_new(dest)
                .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
            // Bounded by what is left of the budget, whatever the file grows to meanwhile.
            let limit = budget.bytes.saturating_add(1);
            let copied = std::io::copy(&mut std::io::Read::take(&mut from, limit), &mut file)
                .map_err(|e| format!("cannot copy {}: {e}", dest.display()))?;
            budget.bytes = budget
                .bytes
                .checked_sub(copied)
                .ok_or(format!("more than {} MiB", MAX_BYTES >> 20))?;
            file.flush()
                .map_err(|e| format!("cannot copy {}: {e}", dest.display()))?;
            // Never setuid or setgid: the mode bits of the file, no more.
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot set the mode of {}: {e}", dest.display()))
        }
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(dir, name, Vec::new()).map_err(what)?;
            let target = std::ffi::OsStr::from_bytes(target.to_bytes());
            std::os::unix::fs::symlink(target, dest)
                .map_err(|e| format!("cannot create {}: {e}", dest.display()))
        }
        // Sockets, FIFOs and devices are no part of a build.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn keys_differ_by_each_part_and_never_by_how_parts_are_cut() {
        let base = BuildKey::new("r", "c", "b", "process");
        assert_ne!(base, BuildKey::new("r2", "c", "b", "process"));
        assert_ne!(base, BuildKey::new("r", "c2", "b", "process"));
        assert_ne!(base, BuildKey::new("r", "c", "b2", "process"));
        assert_ne!(base, BuildKey::new("r", "c", "b", "docker:x"));
        assert_ne!(
            BuildKey::new("ab", "c", "b", "p"),
            BuildKey::new("a", "bc", "b", "p")
        );
        assert_eq!(base, BuildKey::new("r", "c", "b", "process"));
    }

    #[tokio::test]
    async fn a_published_build_is_a_copy_that_keeps_modes_and_links_but_follows_none() {
        let dir = tempfile::tempdir().unwrap();
        let checkout = dir.path().join("checkout");
        std::fs::create_dir_all(checkout.join("bin")).unwrap();
        std::fs::write(checkout.join("bin/app"), "binary").unwrap();
        std::fs::set_permissions(
            checkout.join("bin/app"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::write(dir.path().join("secret"), "not part of the build").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), checkout.join("link")).unwrap();
        nix::unistd::mkfifo(&checkout.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();

        let store = SharedBuilds::open(&dir.path().join("builds")).unwrap();
        let key = BuildKey::new("https://git/r.git", "abc", "go build", "process");
        assert_eq!(store.get(&key), None);
        store.publish(&key, &checkout).await.unwrap();
        let shared = store.get(&key).expect("published");

        assert_eq!(std::fs::read(shared.join("bin/app")).unwrap(), b"binary");
        let mode = std::fs::metadata(shared.join("bin/app")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o755, "setuid is dropped, the rest kept");
        assert_eq!(
            std::fs::read_link(shared.join("link")).unwrap(),
            dir.path().join("secret"),
            "a link is copied as a link"
        );
        assert!(!shared.join("fifo").exists());
        let root = std::fs::metadata(dir.path().join("builds")).unwrap().mode();
        assert_eq!(root & 0o777, 0o700);

        // The checkout changes afterwards; the shared build does not.
        std::fs::write(checkout.join("bin/app"), "changed").unwrap();
        assert_eq!(std::fs::read(shared.join("bin/app")).unwrap(), b"binary");
    }

    #[tokio::test]
    async fn a_link_in_place_of_the_checkout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("checkout")).unwrap();
        let store = SharedBuilds::open(&dir.path().join("builds")).unwrap();
        let key = BuildKey::new("r", "c", "b", "process");
        assert!(
            store
                .publish(&key, &dir.path().join("checkout"))
                .await
                .is_err()
        );
        assert_eq!(store.get(&key), None);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("builds"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "nothing half copied is left");
    }

    #[test]
    fn only_the_most_recently_used_builds_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..KEPT + 3 {
            let d = dir.path().join(format!("{i:04}"));
            std::fs::create_dir(&d).unwrap();
            let age = std::time::Duration::from_secs(1000 - i as u64);
            std::fs::File::open(&d)
                .unwrap()
                .set_modified(SystemTime::now() - age)
                .unwrap();
        }
        evict(dir.path());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left.len(), KEPT);
        assert_eq!(left[0], "0003", "the three oldest went");
    }
}
