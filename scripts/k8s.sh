#!/usr/bin/env bash
# A real Kubernetes for tests, built offline and run on the local Docker Engine:
#
#   scripts/k8s.sh build
#       Builds once, into ${XDG_CACHE_HOME:-~/.cache}/sdp-test/k8s, what is missing of:
#       kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl v1.20.2
#       from Debian bookworm's `kubernetes` source package (with three fixes, below); etcd from
#       Debian's `etcd-server`; a static pause binary, imported into the engine as
#       sdp-test/pause:3.4. The source tree and Go's build cache are deleted afterwards.
#   scripts/k8s.sh start DIR
#       Starts etcd, the apiserver (token auth, Node and RBAC authorization), the
#       controller-manager, the scheduler and a kubelet (dockershim, node `sdp-node` at
#       127.0.0.1), every state file under DIR (a folder the caller owns), every port on
#       127.0.0.1. Writes DIR/admin.kubeconfig (cluster admin) and waits until the node is
#       Ready. One cluster per Docker Engine at a time: the kubelet owns every `k8s_` container.
#   scripts/k8s.sh stop DIR
#       Stops the kubelet, removes its containers and unmounts what it mounted under DIR,
#       then stops the scheduler, the controller-manager, the apiserver and, last, etcd; puts
#       back the kernel settings the kubelet changed and removes what it wrote outside DIR.
#   scripts/k8s.sh token DIR NAME NAMESPACE ROLE_MANIFEST
#       Creates NAMESPACE if needed, applies ROLE_MANIFEST (its Roles) in it, and a
#       ServiceAccount NAME bound to those Roles only; writes DIR/NAME.kubeconfig, which acts
#       as that ServiceAccount, and prints its path.
#
# Why these choices (see ../shared/NOTES.md "A real Kubernetes, offline"): no image can be
# pulled and the Go module proxy is out of reach, so everything comes from Debian. Under
# Go 1.18+ the vendored reflect2 1.0.1 crashes the apiserver on the first Deployment write, so
# it is replaced by Debian's 1.0.2; these VMs cannot set negative OOM scores, so the kubelet
# sets 0 for sandboxes and guaranteed pods; and tests reach everything on loopback, so the
# kubelet accepts 127.0.0.1 as the node's IP. Tokens live in files of mode 600, never in an
# argv. Needs root (the kubelet drives the engine and mounts volumes). docs/kubernetes-tests.md
# says how long each step takes and what a test must know.
set -euo pipefail

K8S_VERSION=1.20.2
PAUSE_IMAGE=sdp-test/pause:3.4
NODE=sdp-node
# Resolved, since a running component is recognised by its /proc/PID/exe.
cache=$(realpath -m "${XDG_CACHE_HOME:-$HOME/.cache}/sdp-test/k8s")
bin="$cache/bin"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)

say() { echo "k8s.sh: $*"; }
die() { echo "k8s.sh: $*" >&2; exit 1; }

# Installs the Debian packages a step needs, once: only those missing, after an apt-get update.
need_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# --- build ---------------------------------------------------------------------------------

# apt-get with a private list of source archives (bookworm and its security updates), so the
# host's apt configuration gains no deb-src line.
src_apt() {
  local apt="$cache/apt"
  if [ ! -f "$apt/sources.list" ]; then
    mkdir -p "$apt/lists/partial" "$apt/parts" "$apt/archives/partial"
    cat >"$apt/sources.list" <<'EOF'
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
EOF
  fi
  apt-get -o APT::Sandbox::User=root -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts="$apt/parts" \
    -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt" -o Dir::Cache::Archives="$apt/archives" \
    "$@"
}

# The Kubernetes source tree, unpacked and fixed, in $cache/src/kubernetes.
kubernetes_source() {
  local src="$cache/src"
  [ -f "$src/kubernetes/.sdp-fixed" ] && return
  rm -rf "$src"
  mkdir -p "$src"
  say "downloading the kubernetes source package"
  src_apt update -qq
  (cd "$src" && src_apt source --download-only -qq kubernetes >/dev/null)
  say "unpacking it"
  (cd "$src" && nice -n 19 dpkg-source -x --no-check ./kubernetes_*.dsc kubernetes >/dev/null)
  rm -f "$src"/kubernetes_*
  local tree="$src/kubernetes"
  head -n1 "$tree/debian/changelog" | grep -q "$K8S_VERSION" ||
    die "the kubernetes source package is not v$K8S_VERSION"

  # reflect2 1.0.1 reads Go's runtime internals that changed in Go 1.18.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  find "$tree/vendor/github.com/modern-go/reflect2" -name '*_test.go' -delete

  # A negative OOM score adjustment is refused on these machines, and the pod would not start.
  sed -i 's/^\(\s*defaultSandboxOOMAdj\s\+int\s*=\s*\)-[0-9]\+/\10/' \
    "$tree/pkg/kubelet/dockershim/docker_sandbox.go"
  sed -i 's/^\(\s*guaranteedOOMScoreAdj\s\+int\s*=\s*\)-[0-9]\+/\10/' \
    "$tree/pkg/kubelet/qos/policy.go"
  grep -Eq 'defaultSandboxOOMAdj\s+int\s*=\s*0$' "$tree/pkg/kubelet/dockershim/docker_sandbox.go" ||
    die "could not set defaultSandboxOOMAdj to 0"
  grep -Eq 'guaranteedOOMScoreAdj\s+int\s*=\s*0$' "$tree/pkg/kubelet/qos/policy.go" ||
    die "could not set guaranteedOOMScoreAdj to 0"
  # The tests reach everything on loopback, so the node's address is 127.0.0.1; a refused
  # --node-ip leaves the node with no address, hostNetwork pods with no IP, and the apiserver
  # with no way to the kubelet for logs.
  local checks
  mapfile -t checks < <(grep -rl --include='*.go' --exclude='*_test.go' \
    "nodeIP can't be loopback address" "$tree/pkg/kubelet")
  [ ${#checks[@]} -gt 0 ] || die "no loopback check of the node IP found"
  sed -i '/if [a-zA-Z.]*nodeIP\.IsLoopback() {/,+2d' "${checks[@]}"
  ! grep -q "nodeIP can't be loopback address" "${checks[@]}" || die "could not allow a loopback node IP"
  touch "$tree/.sdp-fixed"
}

build_kubernetes() {
  local todo=() name
  for name in "${binaries[@]}"; do
    [ -x "$bin/$name" ] || todo+=("cmd/$name")
  done
  if [ ${#todo[@]} -gt 0 ]; then
    kubernetes_source
    local tree="$cache/src/kubernetes"
    say "building ${todo[*]} (about 15 minutes for all five on 2 cores)"
    (
      cd "$tree"
      export GOCACHE="$cache/src/gocache" GOPATH="$cache/src/gopath" GOFLAGS=-mod=vendor
      export KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_TREE_STATE=clean
      nice -n 19 make WHAT="${todo[*]}" >"$cache/src/make.log" 2>&1 ||
        { tail -n 40 "$cache/src/make.log" >&2; die "make failed (log: $cache/src/make.log)"; }
    )
    mkdir -p "$bin"
    for name in "${todo[@]}"; do
      cp "$tree/_output/local/go/bin/${name#cmd/}" "$bin/"
    done
  fi
  if [ ! -x "$bin/pause" ]; then
    kubernetes_source
    say "building the pause binary"
    mkdir -p "$bin"
    gcc -Os -Wall -Werror -static -DVERSION=v3.4-sdp -o "$bin/pause" "$cache/src/kubernetes/build/pause/linux/pause.c"
  fi
}

build_etcd() {
  [ -x "$bin/etcd" ] && return
  say "unpacking etcd from Debian's etcd-server"
  local work
  work=$(mktemp -d)
  apt-cache show etcd-server >/dev/null 2>&1 || apt-get update -qq
  (cd "$work" && apt-get download -qq etcd-server >/dev/null 2>&1) || die "apt-get download etcd-server failed"
  dpkg-deb -x "$work"/etcd-server_*.deb "$work/root"
  mkdir -p "$bin"
  cp "$work/root/usr/bin/etcd" "$bin/etcd"
  rm -rf "$work"
}

# The pause image of every pod's sandbox, FROM scratch, loaded into the local engine.
pause_image() {
  docker image inspect "$PAUSE_IMAGE" >/dev/null 2>&1 && return
  say "making the image $PAUSE_IMAGE"
  local ctx
  ctx=$(mktemp -d)
  cp "$bin/pause" "$ctx/pause"
  printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' >"$ctx/Dockerfile"
  local out
  out=$(docker build -q -t "$PAUSE_IMAGE" "$ctx" 2>&1) || { echo "$out" >&2; die "docker build of $PAUSE_IMAGE failed"; }
  rm -rf "$ctx"
}

built() {
  local name
  for name in "${binaries[@]}" etcd pause; do
    [ -x "$bin/$name" ] || return 1
  done
  docker image inspect "$PAUSE_IMAGE" >/dev/null 2>&1
}

cmd_build() {
  [ "$(id -u)" -eq 0 ] || die "build needs root (apt-get)"
  if built; then
    say "everything is built in $cache ($(du -sh "$cache" | cut -f1)); nothing to do"
    return
  fi
  local started=$SECONDS
  need_packages dpkg-dev rsync make gcc libc6-dev golang-go golang-github-modern-go-reflect2-dev \
    curl openssl
  build_kubernetes
  build_etcd
  pause_image
  rm -rf "$cache/src" "$cache/apt"
  say "built in $((SECONDS - started)) s; $cache holds $(du -sh "$cache" | cut -f1)"
}

# --- a cluster under DIR --------------------------------------------------------------------

# The kernel settings the kubelet changes on start (its "kernel tunables"), put back on stop.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Where the kubelet writes whatever its flags say: its device plugin socket and the pods' logs.
# Those it creates are removed on stop, and so are its pods' logs.
HOST_PATHS=(/var/lib/kubelet /var/log/pods /var/log/containers)

# Free ports on 127.0.0.1, one a line.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print("\n".join(str(s.getsockname()[1]) for s in held))
EOF
}

# A kubeconfig for the cluster under $dir acting with a token; written with mode 600.
write_kubeconfig() {
  local path=$1 user=$2 token=$3 namespace=${4:-default}
  (
    umask 077
    cat >"$path" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sdp-test
  cluster:
    server: https://127.0.0.1:$(cat "$dir/run/apiserver.port")
    certificate-authority-data: $(base64 -w0 "$dir/pki/ca.crt")
users:
- name: $user
  user:
    token: $token
contexts:
- name: sdp-test
  context:
    cluster: sdp-test
    user: $user
    namespace: $namespace
current-context: sdp-test
EOF
  )
}

# A CA, the apiserver's serving certificate (127.0.0.1 and localhost), the service account
# signing key, and one token per component; all under $dir/pki, readable by root only.
make_credentials() {
  local pki="$dir/pki"
  mkdir -p "$pki"
  chmod 700 "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 \
      -subj /CN=sdp-test-ca 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj /CN=kube-apiserver 2>/dev/null
    printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:10.0.0.1' \
      'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' \
      'extendedKeyUsage=serverAuth' >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
  )
  local admin cm scheduler kubelet
  admin=$(openssl rand -hex 32)
  cm=$(openssl rand -hex 32)
  scheduler=$(openssl rand -hex 32)
  kubelet=$(openssl rand -hex 32)
  printf '%s\n' "$admin,admin,admin,system:masters" \
    "$cm,system:kube-controller-manager,kube-controller-manager" \
    "$scheduler,system:kube-scheduler,kube-scheduler" \
    "$kubelet,system:node:$NODE,kubelet,system:nodes" >"$pki/tokens.csv"
  write_kubeconfig "$dir/admin.kubeconfig" admin "$admin"
  write_kubeconfig "$pki/controller-manager.kubeconfig" system:kube-controller-manager "$cm"
  write_kubeconfig "$pki/scheduler.kubeconfig" system:kube-scheduler "$scheduler"
  write_kubeconfig "$pki/kubelet.kubeconfig" "system:node:$NODE" "$kubelet"
}

# Runs a component in a session of its own, its output in $dir/logs/NAME.log.
launch() {
  local name=$1
  shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/run/$name.pid"
}

# Waits until COMMAND succeeds, for at most SECONDS; on timeout shows the log of NAME.
wait_for() {
  local what=$1 seconds=$2 name=$3
  shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ] || ! running "$name"; then
      echo "k8s.sh: $what did not happen in $seconds s; the end of $dir/logs/$name.log:" >&2
      tail -n 30 "$dir/logs/$name.log" >&2
      return 1
    fi
    sleep 0.5
  done
}

# The pid of component NAME if it is still that process (not a reused pid).
pid_of() {
  local pid
  pid=$(cat "$dir/run/$1.pid" 2>/dev/null) || return 1
  [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$bin/$1" ] || return 1
  echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

# Ends component NAME: SIGTERM, then SIGKILL after 15 s.
end() {
  local pid i
  pid=$(pid_of "$1") || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 150; i++)); do
    running "$1" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    running "$1" || return 0
    sleep 0.1
  done
}

node_ready() {
  [ "$("$bin/kubectl" --kubeconfig="$dir/admin.kubeconfig" get node "$NODE" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

kubelet_containers() {
  docker ps -aq --filter name=k8s_ --filter label=io.kubernetes.docker.type
}

set_dir() {
  [ -n "${1:-}" ] || die "which DIR?"
  [ -d "$1" ] || die "$1 is not a folder"
  dir=$(realpath "$1")
}

cmd_start() {
  [ "$(id -u)" -eq 0 ] || die "start needs root (the kubelet)"
  [ -z "${1:-}" ] || mkdir -p "$1"
  set_dir "$1"
  built || die "nothing built yet: run scripts/k8s.sh build"
  local started=$SECONDS
  local pid
  for pid in $(pgrep -x kubelet || true); do
    [ "$(readlink "/proc/$pid/exe")" != "$bin/kubelet" ] ||
      die "another cluster of k8s.sh runs on this machine: one at a time (its kubelet owns the engine's k8s_ containers)"
  done
  if [ -n "$(kubelet_containers)" ]; then
    say "removing the containers an earlier kubelet left"
    kubelet_containers | xargs -r docker rm -f >/dev/null
  fi
  [ ! -e "$dir/run" ] || die "$dir already holds a cluster: stop it, or use an empty folder"
  mkdir -p "$dir/logs" "$dir/run"
  trap 'echo "k8s.sh: start failed; stopping what started" >&2; cmd_stop "$dir" >&2' EXIT
  local ports etcd_port peer_port api_port cm_port sched_port kubelet_port health_port
  mapfile -t ports < <(free_ports 7)
  read -r etcd_port peer_port api_port cm_port sched_port kubelet_port health_port <<<"${ports[*]}"
  echo "$api_port" >"$dir/run/apiserver.port"
  make_credentials
  local sysctl
  for sysctl in "${SYSCTLS[@]}"; do
    echo "$sysctl=$(sysctl -n "$sysctl")"
  done >"$dir/run/sysctl.saved"
  local path
  for path in "${HOST_PATHS[@]}"; do
    [ -e "$path" ] || echo "$path"
  done >"$dir/run/host-paths.created"
  ls /var/log/pods >"$dir/run/pod-logs.before" 2>/dev/null || true

  launch etcd "$bin/etcd" --name default --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port"
  wait_for "etcd's health" 30 etcd curl -sf "http://127.0.0.1:$etcd_port/health"

  launch kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --secure-port "$api_port" --cert-dir "$dir/apiserver" \
    --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --service-cluster-ip-range 10.0.0.0/24 --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$dir/pki/sa.key" --service-account-signing-key-file "$dir/pki/sa.key" \
    --token-auth-file "$dir/pki/tokens.csv" --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction --disable-admission-plugins ServiceAccount \
    --kubelet-preferred-address-types InternalIP --profiling=false
  wait_for "the apiserver's readiness" 60 kube-apiserver \
    curl -sf --cacert "$dir/pki/ca.crt" "https://127.0.0.1:$api_port/readyz"

  launch kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$dir/pki/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/pki/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/pki/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$cm_port" --port 0 --cert-dir "$dir/controller-manager" \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --use-service-account-credentials --leader-elect=false --profiling=false
  launch kube-scheduler "$bin/kube-scheduler" --kubeconfig "$dir/pki/scheduler.kubeconfig" \
    --authentication-kubeconfig "$dir/pki/scheduler.kubeconfig" \
    --authorization-kubeconfig "$dir/pki/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" --port 0 --cert-dir "$dir/scheduler" \
    --leader-elect=false --profiling=false
  # Image garbage collection is off: the engine's images are not the kubelet's to delete.
  # iptables chains and hairpin settings would change the host's network for nothing.
  launch kubelet "$bin/kubelet" --kubeconfig "$dir/pki/kubelet.kubeconfig" \
    --hostname-override "$NODE" --node-ip 127.0.0.1 \
    --root-dir "$dir/kubelet" --cert-dir "$dir/kubelet/pki" \
    --experimental-dockershim-root-directory "$dir/dockershim" \
    --volume-plugin-dir "$dir/kubelet/volume-plugins" \
    --container-runtime docker --container-runtime-endpoint "unix://$dir/run/dockershim.sock" \
    --pod-infra-container-image "$PAUSE_IMAGE" \
    --cgroup-driver cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
    --fail-swap-on=false --oom-score-adj 0 \
    --address 127.0.0.1 --port "$kubelet_port" --read-only-port 0 \
    --healthz-bind-address 127.0.0.1 --healthz-port "$health_port" \
    --image-gc-high-threshold 100 --image-gc-low-threshold 99 \
    --make-iptables-util-chains=false --hairpin-mode none
  wait_for "the node's readiness" 120 kubelet node_ready
  trap - EXIT
  say "cluster ready in $((SECONDS - started)) s; kubeconfig $dir/admin.kubeconfig"
}

cmd_stop() {
  set_dir "$1"
  [ -d "$dir/run" ] || die "$dir holds no cluster"
  end kubelet
  kubelet_containers | xargs -r docker rm -f >/dev/null
  local mounts
  mounts=$(findmnt -rn -o TARGET | awk -v under="$dir/" 'index($0, under) == 1' | sort -r)
  if [ -n "$mounts" ]; then
    echo "$mounts" | while read -r target; do
      umount "$target" 2>/dev/null || umount -l "$target"
    done
  fi
  end kube-scheduler
  end kube-controller-manager
  # The apiserver first: it hangs when etcd goes away under it.
  end kube-apiserver
  end etcd
  if [ -f "$dir/run/sysctl.saved" ]; then
    while IFS= read -r setting; do
      sysctl -q -w "$setting" >/dev/null
    done <"$dir/run/sysctl.saved"
  fi
  if [ -f "$dir/run/host-paths.created" ]; then
    xargs -r rm -rf <"$dir/run/host-paths.created"
  fi
  # The logs of this cluster's pods, where the kubelet keeps them whatever its flags say.
  if [ -d /var/log/pods ] && [ -f "$dir/run/pod-logs.before" ]; then
    local entry
    for entry in /var/log/pods/*; do
      [ -e "$entry" ] || continue
      grep -qxF "${entry##*/}" "$dir/run/pod-logs.before" || rm -rf "$entry"
    done
    find /var/log/containers -xtype l -delete 2>/dev/null || true
  fi
  rm -rf "$dir/run"
  say "stopped"
}

cmd_token() {
  [ $# -eq 4 ] || die "usage: k8s.sh token DIR NAME NAMESPACE ROLE_MANIFEST"
  set_dir "$1"
  local name=$2 namespace=$3 manifest=$4
  local kubectl=("$bin/kubectl" --kubeconfig "$dir/admin.kubeconfig")
  "${kubectl[@]}" get namespace "$namespace" >/dev/null 2>&1 ||
    "${kubectl[@]}" create namespace "$namespace" >/dev/null
  local roles
  roles=$("${kubectl[@]}" apply -n "$namespace" -f "$manifest" -o name | sed -n 's|^role\.rbac\.authorization\.k8s\.io/||p')
  [ -n "$roles" ] || die "$manifest holds no Role"
  "${kubectl[@]}" -n "$namespace" get serviceaccount "$name" >/dev/null 2>&1 ||
    "${kubectl[@]}" -n "$namespace" create serviceaccount "$name" >/dev/null
  local role
  for role in $roles; do
    "${kubectl[@]}" -n "$namespace" create rolebinding "$name-$role" --role "$role" \
      --serviceaccount "$namespace:$name" --dry-run=client -o yaml |
      "${kubectl[@]}" apply -f - >/dev/null
  done
  # The token controller gives every ServiceAccount a token Secret (Kubernetes 1.20).
  local secret="" i token
  for ((i = 0; i < 60; i++)); do
    secret=$("${kubectl[@]}" -n "$namespace" get serviceaccount "$name" -o 'jsonpath={.secrets[0].name}')
    [ -n "$secret" ] && break
    sleep 0.5
  done
  [ -n "$secret" ] || die "no token Secret for the ServiceAccount $namespace/$name"
  token=$("${kubectl[@]}" -n "$namespace" get secret "$secret" -o 'jsonpath={.data.token}' | base64 -d)
  write_kubeconfig "$dir/$name.kubeconfig" "$name" "$token" "$namespace"
  echo "$dir/$name.kubeconfig"
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  token) shift && cmd_token "$@" ;;
  *) die "usage: k8s.sh build | start DIR | stop DIR | token DIR NAME NAMESPACE ROLE_MANIFEST" ;;
esac
