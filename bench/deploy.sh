#!/usr/bin/env bash
# Deploy time against doing it by hand (issue 16, goal 2), in one run: the test kit's
# realistic Go service (crates/testkit/fixtures/shop: 3,500 lines, its modules vendored, built
# offline) cloned, built, started and health-checked by hand, then deployed by SDP (the
# release `sdp` binary as server, gateway agent and micro agent with the process runtime,
# against the kit's git server with Basic auth and two users):
#
#   a new sandbox of a commit no one built        goal <= 1.1x by hand
#   a second sandbox of that commit, another user  goal <  0.2x by hand
#   an unchanged redeploy                         goal <  1 s
#   a sandbox of three services                   goal close to the slowest single service
#
# It prints human-readable lines, then one line per figure:
# `figure|<name>|<value>|<goal>|<met or NOT met>`. See crates/sdp/benches/deploy.rs for what
# is timed and which caches are warm, and docs/benchmarks.md for a run's output.
#
#   bench/deploy.sh              # ROUNDS=5
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v git >/dev/null 2>&1 || missing+=(git)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v useradd >/dev/null 2>&1 || missing+=(passwd)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "deploy.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

ROUNDS=${ROUNDS:-5} cargo bench --locked -p sdp --bench deploy
