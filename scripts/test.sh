#!/usr/bin/env bash
# Runs every test of SDP. It first installs what the tests need, so it works on a fresh
# machine with only the Rust toolchain: git (with git http-backend, for the test git server),
# util-linux, passwd and procps (user code runs as a user the tests create),
# python3 (the tests read the server's SQLite file with it), Go (the deploy tests build a
# real Go service), busybox-static (the offline image the docker tests run services in),
# Chromium with chromedriver (the dashboard is tested in a real browser), openssh-server,
# nginx and systemd's tools (the deploy script is tested over ssh), docker-compose (the
# compose stack is started with Debian's, from the images scripts/images.sh makes of Debian
# packages with apt-get download and dpkg), and schemathesis (from PyPI, into a venv outside
# the repository: the API is fuzzed from its OpenAPI document), and nightly Rust with
# cargo-fuzz (the router's fast-path parser is fuzzed for a bounded time, last). The docker
# tests need a running Docker Engine; with CI=true its absence fails them. Tests of the
# in-process tier (crates/testkit, `InProcessEnv`) need none of these but python3.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v git >/dev/null 2>&1 || missing+=(git)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
# The isolation tests run user code as another user (setpriv, flock and setsid from
# util-linux, useradd) and end what it leaves behind (pkill).
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v useradd >/dev/null 2>&1 || missing+=(passwd)
command -v pkill >/dev/null 2>&1 || missing+=(procps)
# The static build is checked with `file`, and run in a network namespace of its own (`ip`).
command -v file >/dev/null 2>&1 || missing+=(file)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# The shipping tests (crates/sdp/tests/it/ship.rs) run scripts/deploy.sh against real sshd
# processes, check the nginx site with nginx -t and the units with systemd-analyze verify, and
# deploy.sh makes the users with systemd-sysusers.
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -x /usr/bin/systemd-analyze ] && [ -x /usr/bin/systemd-sysusers ] || missing+=(systemd)
# The compose test: Debian's docker-compose starts the stack; scripts/images.sh unpacks the
# micro agent's packages (dpkg-deb, ldconfig: present on any Debian).
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "test.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
# The router's fast-path parser is fuzzed with libFuzzer (fuzz/), which needs nightly Rust.
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "test.sh: installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
# The API fuzzing test (crates/sdp/tests/it/openapi.rs) runs schemathesis from this venv,
# which it finds through SDP_TEST_SCHEMATHESIS.
venv="${XDG_CACHE_HOME:-$HOME/.cache}/sdp-test/venv"
if [ ! -x "$venv/bin/schemathesis" ]; then
  echo "test.sh: installing schemathesis into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'schemathesis>=4,<5'
fi
export SDP_TEST_SCHEMATHESIS="$venv/bin/schemathesis"

# The integration tests run user code as an unprivileged user they create when run as root
# (sdp-it-run, and sdp-it-plain for an agent run without root; see crates/testkit/src/users.rs);
# remove them, and anything left running as them, once they are done; and stop the test
# cluster if it still runs. Each step may find nothing to do; under `set -e` a failing one
# would turn a green run's exit status into 1.
k8s_dir=""
stop_cluster() {
  if [ -n "$k8s_dir" ]; then
    ./scripts/k8s.sh stop "$k8s_dir" || true
    rm -rf "$k8s_dir"
    k8s_dir=""
  fi
}
cleanup() {
  stop_cluster
  if [ "$(id -u)" -eq 0 ]; then
    for u in sdp-it-run sdp-it-plain; do
      pkill -KILL -u "$u" 2>/dev/null || true
      userdel "$u" 2>/dev/null || true
    done
  fi
}
trap cleanup EXIT

cargo fmt --all -- --check
# The control plane's modules must not import each other in a circle (ARCHITECTURE.md).
python3 scripts/check-acyclic.py crates/server/src crates/router/src
cargo clippy --workspace --all-targets --locked -- -D warnings
# The statically linked binary operators install, in the tests' faster profile: the
# static_build test runs it with no shared library around, and the compose test packages it
# into images (scripts/images.sh).
SDP_BUILD_PROFILE=ci-static ./scripts/build.sh
SDP_TEST_STATIC_BIN="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/x86_64-unknown-linux-gnu/ci-static/sdp"
export SDP_TEST_STATIC_BIN
# Every test but the kubernetes runtime's (crates/sdp/tests/it/kubernetes.rs), which need a
# real cluster: built once into a cache outside the repository (9 to 15 minutes on 2 cores
# when missing, nothing when present), started for those tests only (about 20 s) and stopped
# after them, whatever they gave (docs/kubernetes-tests.md). The kubelet needs root.
status=0
cargo nextest run --workspace --locked --no-fail-fast -E 'not test(/^kubernetes::/)' || status=$?
if [ "$(id -u)" -eq 0 ]; then
  ./scripts/k8s.sh build
  k8s_dir=$(mktemp -d)
  ./scripts/k8s.sh start "$k8s_dir"
  SDP_TEST_K8S_DIR="$k8s_dir" cargo nextest run --workspace --locked --no-fail-fast \
    -E 'test(/^kubernetes::/)' || status=$?
  stop_cluster
else
  echo "test.sh: the kubernetes runtime's tests need root (a kubelet): not run"
fi
[ "$status" -eq 0 ] || exit "$status"
# A bounded run of the fuzzer over the router's fast-path parser: each input is also read by
# hyper, and any difference fails (fuzz/fuzz_targets/h1.rs). FUZZ_SECONDS=0 skips it.
if [ "${FUZZ_SECONDS:-60}" -gt 0 ]; then
  # New inputs go to the first folder (fuzz/corpus, not kept); fuzz/seeds holds plain
  # requests and answers to start from.
  mkdir -p fuzz/corpus/h1
  cargo +nightly fuzz run h1 fuzz/corpus/h1 fuzz/seeds/h1 -- -max_total_time="${FUZZ_SECONDS:-60}"
fi
