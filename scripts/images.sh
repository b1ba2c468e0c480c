#!/usr/bin/env bash
# Builds SDP's container images without any registry, from the statically linked binary of
# scripts/build.sh:
#
#   scripts/images.sh [SDP_BINARY]
#
#   sdp:<tag>        FROM scratch: the binary, a CA bundle, /etc/passwd with the user `sdp`
#                    (uid 10000, whom it runs as) and its data folders. The control plane and
#                    the gateway agent (docker-compose.yml runs it twice).
#   sdp-micro:<tag>  a root filesystem unpacked from Debian 12 packages (dpkg -x) with what a
#                    micro agent runs (git, setpriv, tar, sh, coreutils, the CA bundle; see
#                    images/micro-packages.txt), the binary, and the user `sdp-run` (uid
#                    10001) for `run_as`. It runs as root, to switch users and to drive the
#                    engine through its socket.
#
# SDP_BINARY (or SDP_IMAGES_BIN) is the binary to package; by default the release build,
# ${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/sdp. SDP_IMAGE_TAG is the tag
# (default: the version in Cargo.toml). SDP_MICRO_PACKAGES adds Debian packages to the micro
# image, such as the toolchain its builds need ("golang-go"): builds run in that container.
#
# The packages come from the Debian archive this host's apt knows (`apt-get download`: no
# registry, and nothing installed on the host); they and the unpacked root filesystem are
# kept under ${XDG_CACHE_HOME:-~/.cache}/sdp-images, so a second run downloads nothing and
# rebuilds only the layer of a changed binary. Needs Debian 12 (bookworm) apt, dpkg and docker.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=${CARGO_TARGET_DIR:-target}
bin=${1:-${SDP_IMAGES_BIN:-$target_dir/x86_64-unknown-linux-gnu/release/sdp}}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
tag=${SDP_IMAGE_TAG:-$version}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/sdp-images"

[ -x "$bin" ] || { echo "images.sh: no sdp binary at $bin: run scripts/build.sh, or name one" >&2; exit 1; }
case "$(file -b "$bin")" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) echo "images.sh: $bin is not statically linked (scripts/build.sh makes one)" >&2; exit 1 ;;
esac

# --- Debian packages -----------------------------------------------------------------------
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' images/micro-packages.txt | grep -v '^$' | grep -v '^-')
mapfile -t excluded < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' images/micro-packages.txt | sed -n 's/^-//p')
# shellcheck disable=SC2206 # a list of package names, split on spaces on purpose
wanted+=(${SDP_MICRO_PACKAGES:-})
if ! apt-cache show "${wanted[@]}" >/dev/null 2>&1; then
  echo "images.sh: updating apt's package lists"
  apt-get update -qq
fi
# Every dependency, with every alternative, except what is left out and what only the
# excluded bring: a walk from the wanted packages over `apt-cache depends --recurse`'s graph.
# A virtual package (`<name>`) leads to each package that provides it.
mapfile -t packages < <(
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "${wanted[@]}" |
    awk -v roots="${wanted[*]}" -v skip="${excluded[*]}" '
      function bare(name) { sub(/^</, "", name); sub(/>$/, "", name); sub(/:any$/, "", name); return name }
      /^[^ ]/ { pkg = bare($1); virtual = ""; next }
      /^ [ |](Pre)?Depends: / {
        dep = bare($2); virtual = ($2 ~ /^</) ? dep : ""
        if (virtual != "") virtuals[dep] = 1
        edges[pkg] = edges[pkg] " " dep; next
      }
      /^    [^ ]/ && virtual != "" { edges[virtual] = edges[virtual] " " bare($1); next }
      END {
        n = split(skip, s, " "); for (i = 1; i <= n; i++) left[s[i]] = 1
        n = split(roots, queue, " "); head = 1
        while (head <= n) {
          p = queue[head++]
          if (p in seen || p in left) continue
          seen[p] = 1
          # A virtual package has no archive of its own.
          if (!(p in virtuals)) print p
          m = split(edges[p], d, " "); for (j = 1; j <= m; j++) queue[++n] = d[j]
        }
      }' | sort -u
)
debs="$cache/debs"
mkdir -p "$debs"
# The exact files of the candidate versions (`<name>_<version>_<arch>.deb`); only those
# missing from the cache are fetched.
mapfile -t uris < <(apt-get download --print-uris "${packages[@]}" | awk '{print $2}')
if [ ${#uris[@]} -ne ${#packages[@]} ]; then
  echo "images.sh: apt has no archive for some of: ${packages[*]}" >&2
  exit 1
fi
missing=()
for f in "${uris[@]}"; do
  [ -f "$debs/$f" ] || missing+=("${f%%_*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "images.sh: downloading ${#missing[@]} Debian packages into $debs"
  (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "${missing[@]}")
fi

# --- the micro agent's root filesystem ---------------------------------------------------
# Made again only when the set of package files changes.
key=$(printf '%s\n' "${uris[@]}" | sort | sha256sum | cut -c1-16)
rootfs="$cache/micro-rootfs-$key.tar"
if [ ! -f "$rootfs" ]; then
  echo "images.sh: unpacking ${#uris[@]} packages into the micro agent's root filesystem"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  for f in "${uris[@]}"; do dpkg -x "$debs/$f" "$root"; done
  [ -e "$root/bin/sh" ] || ln -s dash "$root/bin/sh"
  # What update-ca-certificates would make at install time: one bundle of Mozilla's roots.
  mkdir -p "$root/etc/ssl/certs"
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt > "$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/bin/sh\nsdp-run:x:10001:10001:SDP user code:/nonexistent:/usr/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nsdp-run:x:10001:\n' > "$root/etc/group"
  echo 'include /etc/ld.so.conf.d/*.conf' > "$root/etc/ld.so.conf"
  ldconfig -r "$root"
  rm -rf "$root"/usr/share/{doc,man,info,locale,lintian} "$root/tmp"
  install -d -m 1777 "$root/tmp"
  # The same bytes for the same packages, so that the engine's layer cache holds.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='@0' -C "$root" -cf "$rootfs.part" .
  mv "$rootfs.part" "$rootfs"
  rm -rf "$root"
  trap - EXIT
fi

# --- the scratch image's few files ---------------------------------------------------------
base="$cache/base-$key.tar"
if [ ! -f "$base" ]; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/etc/ssl/certs"
  tar -xf "$rootfs" -C "$root" ./etc/ssl/certs/ca-certificates.crt
  printf 'root:x:0:0:root:/:/nonexistent\nsdp:x:10000:10000:SDP:/var/lib/sdp:/nonexistent\n' > "$root/etc/passwd"
  printf 'root:x:0:\nsdp:x:10000:\n' > "$root/etc/group"
  install -d -m 1777 "$root/tmp"
  # Named volumes start as a copy of these folders, owner included.
  install -d -m 0700 -o 10000 -g 10000 "$root/var/lib/sdp" "$root/var/lib/sdp-agent"
  tar --sort=name --numeric-owner --mtime='@0' -C "$root" -cf "$base.part" .
  mv "$base.part" "$base"
  rm -rf "$root"
  trap - EXIT
fi

# --- images ----------------------------------------------------------------------------------
# A build context per image in the cache (hard links where it can: the same file system).
build() {
  local image=$1 dockerfile=$1.Dockerfile layer=$2 context="$cache/context-$1" old new out
  rm -rf "$context"
  mkdir -p "$context"
  ln "$layer" "$context/rootfs.tar" 2>/dev/null || cp "$layer" "$context/rootfs.tar"
  cp "$bin" "$context/sdp"
  cp "images/$dockerfile" "$context/Dockerfile"
  old=$(docker image inspect -f '{{.Id}}' "$image:$tag" 2>/dev/null || true)
  # Quiet unless it fails: the engine's legacy builder warns that it is deprecated.
  if ! out=$(docker build -q --network none --label "org.opencontainers.image.version=$version" \
    -t "$image:$tag" "$context" 2>&1); then
    echo "images.sh: docker build of $image:$tag failed:" >&2
    echo "$out" >&2
    exit 1
  fi
  new=$(docker image inspect -f '{{.Id}}' "$image:$tag")
  # The image this tag named before: removed once no tag names it, unless a container
  # still uses it.
  if [ -n "$old" ] && [ "$old" != "$new" ] &&
    [ "$(docker image inspect -f '{{len .RepoTags}}' "$old" 2>/dev/null)" = 0 ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
  rm -rf "$context"
  echo "images.sh: $image:$tag ($(docker image inspect -f '{{.Size}}' "$image:$tag") bytes)"
}
build sdp "$base"
build sdp-micro "$rootfs"

# What a micro agent runs must start in its image: a missing library shows here, not at the
# first deploy.
check=$(docker run --rm --network none --entrypoint /bin/sh "sdp-micro:$tag" -c \
  'git --version && /usr/lib/git-core/git-remote-http 2>&1; setpriv --version && tar --version | head -n1 && sdp --version' 2>&1 || true)
case "$check" in
  *"error while loading shared libraries"* | *"not found"*)
    echo "images.sh: sdp-micro:$tag cannot run what the agent needs:" >&2
    echo "$check" >&2
    exit 1
    ;;
esac
docker run --rm --network none "sdp:$tag" --version >/dev/null
