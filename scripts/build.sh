#!/usr/bin/env bash
# Builds the release of SDP that operators install: one statically linked `sdp` binary, and a
# tarball with it, the `deploy/` files and their checksums (what scripts/deploy.sh installs).
#
#   scripts/build.sh            # release profile, into dist/
#   SDP_BUILD_PROFILE=ci-static scripts/build.sh   # the same, built faster (the tests' own)
#
# The musl target cannot be installed here, so the binary is linked statically against glibc
# (`crt-static` on the gnu target). glibc 2.34 and later carry the `files` and `dns` name
# services inside libc, so the static binary resolves `localhost`, /etc/hosts entries and DNS
# names, and finds users in /etc/passwd, with no shared library present (the test
# `static_build` shows it in an empty root). Name services that are loaded modules (sss, ldap)
# are out of its reach: users and hosts must be in files or DNS.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
profile=${SDP_BUILD_PROFILE:-release}
case "$profile" in
  dev) profile_dir=debug ;;
  *) profile_dir=$profile ;;
esac
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || { echo "build.sh: cannot read the version from Cargo.toml" >&2; exit 1; }
name="sdp-${version}-x86_64-linux"
target_dir=${CARGO_TARGET_DIR:-target}

# An explicit --target keeps build scripts and proc macros dynamic (they run on this host)
# and puts the static build apart from the usual one.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --locked -p sdp --bin sdp --profile "$profile" --target "$target"
bin="$target_dir/$target/$profile_dir/sdp"

kind=$(file -b "$bin")
case "$kind" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *)
    echo "build.sh: $bin is not statically linked: $kind" >&2
    exit 1
    ;;
esac
echo "build.sh: $bin: $kind"
echo "build.sh: size $(stat -c %s "$bin") bytes, sha256 $(sha256sum "$bin" | cut -d' ' -f1)"

stage="dist/$name"
rm -rf "$stage"
mkdir -p "$stage"
cp "$bin" "$stage/sdp"
cp -r deploy "$stage/deploy"
(cd "$stage" && find sdp deploy -type f -print0 | sort -z | xargs -0 sha256sum > SHA256SUMS)
# The same bytes for the same inputs: fixed owners, times and order.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' \
  -czf "dist/$name.tar.gz" -C dist "$name"
(cd dist && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
echo "build.sh: dist/$name.tar.gz ($(stat -c %s "dist/$name.tar.gz") bytes), sha256 $(cut -d' ' -f1 "dist/$name.tar.gz.sha256")"
