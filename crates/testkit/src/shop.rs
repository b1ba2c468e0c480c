//! The realistic Go service of the deploy benchmark (`crates/testkit/fixtures/shop`): an HTTP
//! JSON API of 3,500 lines in ten packages, with its third-party modules vendored, so that it
//! builds offline as a company's service would. The catalog names it three times (`shop`,
//! `shop-b`, `shop-c`: one repository each), for a sandbox of three services.

use std::path::{Path, PathBuf};

/// The catalog's services of this source, each with a repository of its own name.
pub const SHOP_SERVICES: [&str; 3] = ["shop", "shop-b", "shop-c"];

/// The catalog's build of the shop: offline from `vendor/`, with `-trimpath` so that the Go
/// build cache serves the vendored packages whatever the checkout's directory (without it,
/// the directory is part of each package's cache key, and every new checkout would compile
/// them all again).
pub const SHOP_BUILD: &str =
    "CGO_ENABLED=0 GOFLAGS=-mod=vendor GOPROXY=off go build -trimpath -o .sdp/bin/app ./cmd/shop";

/// The shop's command, in its checkout.
pub const SHOP_RUN: &str = "./.sdp/bin/app";

/// The file that names the build: every package of the shop depends on it, so a commit that
/// changes it makes the Go toolchain compile the shop's own ten packages again (and none of
/// the vendored ones).
pub const SHOP_REVISION_FILE: &str = "internal/buildinfo/buildinfo.go";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/shop")
}

/// The shop's `internal/buildinfo/buildinfo.go` with `revision` as its `Revision`.
pub fn shop_revision_source(revision: &str) -> String {
    let path = fixture_dir().join(SHOP_REVISION_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let fixed = "const Revision = \"initial\"";
    assert!(text.contains(fixed), "{} names no revision", path.display());
    text.replace(fixed, &format!("const Revision = {revision:?}"))
}

/// Every file of the shop (relative path, content), with `revision` as its revision.
pub fn shop_files(revision: &str) -> Vec<(String, String)> {
    let root = fixture_dir();
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let content = if relative == SHOP_REVISION_FILE {
                shop_revision_source(revision)
            } else {
                std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
            };
            files.push((relative, content));
        }
    }
    files.sort();
    files
}
