#!/usr/bin/env bash
# Installs an SDP release tarball on the hosts that an inventory names, over ssh with keys.
#
#   scripts/deploy.sh [--dry-run] [--rollback] [--tarball FILE] [--ssh-config FILE]
#                     [--identity FILE] INVENTORY
#
# The inventory has one host a line, `#` starting a comment:
#
#   ssh-destination  role[,role...]  [key=value...]
#
# roles: control (sdp server), gateway (the gateway agent), micro (a micro agent), nginx (keep
# the control plane's location block in an nginx site); keys: port=N, prefix=/DIR (install
# root, default /), nginx_site=FILE (role nginx), nginx_conf=FILE (default
# /etc/nginx/nginx.conf). README.md, "Install on your hosts", says what lands where.
#
# ssh runs in batch mode with password and keyboard-interactive logins off: a host that does
# not take the operator's key fails, and nothing ever asks for or reads a password. No
# address is written here: every host comes from the inventory, and the operator's own ssh
# configuration, agent and keys apply. Nothing secret is sent: the units read their tokens
# from /etc/sdp/*.env files that the operator fills in on each host.
set -euo pipefail

# What a host gets for each role: `kind source destination mode units-to-restart`. Sources are
# paths in the release's top folder, destinations paths on the host (under its prefix).
# `bin` is replaced when its checksum differs (the previous one kept), `unit` and `sysusers`
# are installed when absent or different, `config` is created when absent and never
# overwritten.
items_for_role() {
  case $1 in
    control)
      echo "bin sdp /usr/local/bin/sdp 0755 sdp-server.service"
      echo "sysusers deploy/sysusers/sdp.conf /etc/sysusers.d/sdp.conf 0644 -"
      echo "unit deploy/systemd/sdp-server.service /etc/systemd/system/sdp-server.service 0644 sdp-server.service"
      echo "config deploy/config/server.toml /etc/sdp/server.toml 0644 sdp-server.service"
      echo "config deploy/config/server.env /etc/sdp/server.env 0600 sdp-server.service"
      ;;
    gateway)
      echo "bin sdp /usr/local/bin/sdp 0755 sdp-agent-gateway.service"
      echo "sysusers deploy/sysusers/sdp.conf /etc/sysusers.d/sdp.conf 0644 -"
      echo "unit deploy/systemd/sdp-agent-gateway.service /etc/systemd/system/sdp-agent-gateway.service 0644 sdp-agent-gateway.service"
      echo "config deploy/config/agent-gateway.toml /etc/sdp/agent-gateway.toml 0644 sdp-agent-gateway.service"
      echo "config deploy/config/agent-gateway.env /etc/sdp/agent-gateway.env 0600 sdp-agent-gateway.service"
      ;;
    micro)
      echo "bin sdp /usr/local/bin/sdp 0755 sdp-agent-micro.service"
      echo "sysusers deploy/sysusers/sdp-run.conf /etc/sysusers.d/sdp-run.conf 0644 -"
      echo "unit deploy/systemd/sdp-agent-micro.service /etc/systemd/system/sdp-agent-micro.service 0644 sdp-agent-micro.service"
      echo "config deploy/config/agent-micro.toml /etc/sdp/agent-micro.toml 0644 sdp-agent-micro.service"
      echo "config deploy/config/agent-micro.env /etc/sdp/agent-micro.env 0600 sdp-agent-micro.service"
      ;;
  esac
}

# Restarts go in this order across all hosts: every control plane before any agent, so that
# agents reconnect to the new one.
RESTART_ORDER=(sdp-server.service sdp-agent-gateway.service sdp-agent-micro.service)

# The variable each env file must set for its unit to start.
token_var() {
  case $1 in
    */server.env) echo SDP_AGENT_TOKEN ;;
    *) echo SDP_TOKEN ;;
  esac
}

die() {
  echo "deploy.sh: $*" >&2
  exit 1
}

usage_error() {
  echo "deploy.sh: $*" >&2
  echo "usage: scripts/deploy.sh [--dry-run] [--rollback] [--tarball FILE] [--ssh-config FILE] [--identity FILE] INVENTORY" >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------
# What runs on the hosts. These functions are sent over ssh as text (`declare -f`) and run
# there as root (through `sudo -n` when the login user is not root). $1 of r_main is the
# mode, $2 the install root ("" for /).

# The block deploy.sh keeps in an nginx site: the lines of FILE indented by four spaces between
# the two marker lines.
render_block() {
  local line
  printf '    # BEGIN sdp: scripts/deploy.sh replaces what is between these two lines\n'
  while IFS= read -r line || [ -n "$line" ]; do
    if [ -n "$line" ]; then printf '    %s\n' "$line"; else printf '\n'; fi
  done <"$1"
  printf '    # END sdp\n'
}

r_sum() {
  if [ -f "$1" ]; then sha256sum <"$1" | cut -d' ' -f1; else echo -; fi
}

# `missing`, `none` (no markers), `broken` (markers not one BEGIN followed by one END), or
# the checksum of the marked block, markers included.
r_section() {
  local f=$1 begins ends b e
  [ -f "$f" ] || { echo missing; return; }
  begins=$(grep -n '^[[:space:]]*# BEGIN sdp' "$f" | cut -d: -f1 | tr '\n' ' ' || true)
  ends=$(grep -n '^[[:space:]]*# END sdp' "$f" | cut -d: -f1 | tr '\n' ' ' || true)
  if [ -z "$begins" ] && [ -z "$ends" ]; then echo none; return; fi
  read -r -a b <<<"$begins"
  read -r -a e <<<"$ends"
  if [ "${#b[@]}" -ne 1 ] || [ "${#e[@]}" -ne 1 ] || [ "${b[0]}" -ge "${e[0]}" ]; then
    echo broken
    return
  fi
  sed -n "${b[0]},${e[0]}p" "$f" | sha256sum | cut -d' ' -f1
}

r_fail() {
  echo "$*" >&2
  exit 1
}

# Adds units to the host's list of units to restart, kept until they have been restarted, so
# that a run that stopped between installing and restarting is finished by the next one.
r_pending_add() {
  local R=$1 file
  shift
  file="$R/var/lib/sdp/restart-pending"
  mkdir -p "$R/var/lib/sdp"
  { [ -f "$file" ] && cat "$file"; printf '%s\n' "$@"; } | sort -u >"$file.new"
  mv -f "$file.new" "$file"
}

r_inspect() {
  local R=$1 arg kind rest dst var
  shift
  for arg in "$@"; do
    kind=${arg%%=*}
    rest=${arg#*=}
    case $kind in
      file) echo "file $rest $(r_sum "$R$rest")" ;;
      token)
        dst=${rest%%=*}
        var=${rest#*=}
        if [ ! -f "$R$dst" ]; then
          echo "token $dst missing"
        elif grep -q "^[[:space:]]*$var=[^[:space:]]" "$R$dst"; then
          echo "token $dst set"
        else
          echo "token $dst unset"
        fi
        ;;
      nginx) echo "nginx $rest $(r_section "$R$rest")" ;;
    esac
  done
  if [ -f "$R/var/lib/sdp/restart-pending" ]; then
    sed 's/^/pending /' "$R/var/lib/sdp/restart-pending"
  fi
  if [ -f "$R/usr/local/bin/sdp.previous" ]; then echo "previous yes"; else echo "previous no"; fi
}

# Splices the block into the site between its markers (or before the file's last closing
# brace when it has none), after a backup; keeps the change only if nginx -t accepts it.
r_splice() {
  local R=$1 stage=$2 src=$3 site=$4 conf=$5 f state rendered at backup new out
  f="$R$site"
  [ -f "$f" ] || r_fail "the nginx site $site does not exist: install the reference site (deploy/nginx/sdp.conf, with your names and certificates) there, or name your own site in nginx_site"
  rendered="$stage/sdp-block"
  render_block "$stage/$src" >"$rendered"
  state=$(r_section "$f")
  if [ "$state" = "$(sha256sum <"$rendered" | cut -d' ' -f1)" ]; then
    return
  fi
  command -v nginx >/dev/null 2>&1 || r_fail "nginx is not installed, and the nginx role needs it to check the site"
  mkdir -p "$R/var/backups/sdp"
  backup="$R/var/backups/sdp/$(basename "$site").$(date -u +%Y%m%dT%H%M%SZ)"
  [ ! -e "$backup" ] || backup="$backup.$$"
  cp -p "$f" "$backup"
  new=$(mktemp "$(dirname "$f")/.sdp-splice.XXXXXX")
  case $state in
    none)
      at=$(grep -n '^[[:space:]]*}[[:space:]]*$' "$f" | tail -n 1 | cut -d: -f1)
      [ -n "$at" ] || { rm -f "$new"; r_fail "$site has no line with only a closing brace to put the block before: add the two lines '# BEGIN sdp' and '# END sdp' where it belongs"; }
      awk -v blk="$rendered" -v at="$at" 'NR == at { while ((getline l < blk) > 0) print l } { print }' "$f" >"$new"
      ;;
    broken)
      rm -f "$new"
      r_fail "$site has '# BEGIN sdp' and '# END sdp' lines that are not one pair in order: fix them by hand"
      ;;
    *)
      awk -v blk="$rendered" '
        /^[ \t]*# BEGIN sdp/ { while ((getline l < blk) > 0) print l; skip = 1; next }
        skip && /^[ \t]*# END sdp/ { skip = 0; next }
        !skip { print }' "$f" >"$new"
      ;;
  esac
  chmod --reference="$f" "$new"
  chown --reference="$f" "$new"
  mv -f "$new" "$f"
  if ! out=$(nginx -t -q -c "$R$conf" 2>&1); then
    new=$(mktemp "$(dirname "$f")/.sdp-splice.XXXXXX")
    cp -p "$backup" "$new"
    mv -f "$new" "$f"
    r_fail "nginx -t refused $site with the sdp block, so it is back as it was (backup ${backup#"$R"}): $out"
  fi
  systemctl try-reload-or-restart nginx.service
  echo "  nginx site $site: sdp block $([ "$state" = none ] && echo spliced in || echo updated) (backup ${backup#"$R"}); nginx -t passed, nginx reloaded"
}

# stdin: a tar with `manifest` (`kind sha source destination mode units`, then
# `nginx sha source site nginx_conf`) and the sources it names.
r_apply() {
  local R=$1 stage kind sha src dst mode units f more reload=() enable=() sysusers=no restart=()
  stage=$(mktemp -d "${TMPDIR:-/tmp}/sdp-deploy.XXXXXX")
  # shellcheck disable=SC2064 # the trap runs after this function returns, without its locals
  trap "rm -rf '$stage'" EXIT
  tar -xf - -C "$stage"
  while read -r -u 3 kind sha src dst mode units; do
    echo "$sha  $stage/$src" | sha256sum --check --quiet --strict >/dev/null 2>&1 ||
      r_fail "$src arrived with a checksum other than the release's SHA256SUMS says: nothing was installed from it"
  done 3<"$stage/manifest"
  while read -r -u 3 kind sha src dst mode units; do
    f="$R$dst"
    case $kind in
      bin)
        [ "$(r_sum "$f")" != "$sha" ] || continue
        mkdir -p "$(dirname "$f")"
        install -m "$mode" "$stage/$src" "$f.new"
        # Checked again where it will run, then renamed over the old one: a process that starts
        # sdp meanwhile gets the old file or the new one whole, never a part.
        [ "$(r_sum "$f.new")" = "$sha" ] || r_fail "$dst.new does not have the release's checksum after the copy"
        if [ -e "$f" ]; then
          ln -f "$f" "$f.previous"
          mv -f "$f.new" "$f"
          echo "  binary $dst: replaced (the one before is $dst.previous)"
        else
          mv -f "$f.new" "$f"
          echo "  binary $dst: installed"
        fi
        ;;
      unit | sysusers)
        [ "$(r_sum "$f")" != "$sha" ] || continue
        mkdir -p "$(dirname "$f")"
        install -m "$mode" "$stage/$src" "$f.sdp-new"
        if [ -e "$f" ]; then echo "  $kind $dst: replaced"; else echo "  $kind $dst: installed"; fi
        mv -f "$f.sdp-new" "$f"
        if [ "$kind" = unit ]; then
          reload+=("$(basename "$dst")")
          enable+=("$(basename "$dst")")
        else
          sysusers=yes
        fi
        ;;
      config)
        [ ! -e "$f" ] || continue
        mkdir -p "$(dirname "$f")"
        install -m "$mode" "$stage/$src" "$f.sdp-new"
        # A link cannot replace a file, so a config made meanwhile is kept.
        if ln "$f.sdp-new" "$f" 2>/dev/null; then
          echo "  config $dst: created from the example (mode $mode)"
        fi
        rm -f "$f.sdp-new"
        ;;
      nginx)
        r_splice "$R" "$stage" "$src" "$dst" "$mode"
        continue
        ;;
    esac
    if [ "$units" != - ]; then
      IFS=, read -r -a more <<<"$units"
      restart+=("${more[@]}")
    fi
  done 3<"$stage/manifest"
  if [ "$sysusers" = yes ]; then
    systemd-sysusers ${R:+--root="$R"} >/dev/null
    echo "  users: systemd-sysusers applied"
  fi
  if [ "${#reload[@]}" -gt 0 ]; then
    systemctl daemon-reload
    systemctl enable "${enable[@]}"
    echo "  systemd: reloaded; enabled ${enable[*]}"
  fi
  if [ "${#restart[@]}" -gt 0 ]; then
    r_pending_add "$R" "${restart[@]}"
  fi
}

r_restart() {
  local R=$1 file
  shift
  systemctl restart "$@"
  file="$R/var/lib/sdp/restart-pending"
  if [ -f "$file" ]; then
    grep -vxF -f <(printf '%s\n' "$@") "$file" >"$file.new" || true
    if [ -s "$file.new" ]; then mv -f "$file.new" "$file"; else rm -f "$file.new" "$file"; fi
  fi
  echo "  restarted $*"
}

# Puts sdp.previous back in place and keeps the binary it replaces as sdp.previous, so that a
# second rollback undoes the first.
r_rollback() {
  local R=$1 f
  shift
  f="$R/usr/local/bin/sdp"
  [ -f "$f.previous" ] || r_fail "no previous binary (/usr/local/bin/sdp.previous) to roll back to"
  ln -f "$f" "$f.rollback"
  mv -f "$f.previous" "$f"
  mv -f "$f.rollback" "$f.previous"
  echo "  binary /usr/local/bin/sdp: rolled back (the one it replaced is now sdp.previous)"
  r_pending_add "$R" "$@"
}

r_main() {
  set -euo pipefail
  umask 022
  local mode=$1
  shift
  case $mode in
    inspect) r_inspect "$@" ;;
    apply) r_apply "$@" ;;
    restart) r_restart "$@" ;;
    rollback) r_rollback "$@" ;;
  esac
}

REMOTE_FUNCTIONS=(render_block r_sum r_section r_fail r_pending_add r_inspect r_splice r_apply r_restart r_rollback r_main)

# ---------------------------------------------------------------------------------------------
# What runs here.

# Words quoted for the remote login shell.
shell_quote() {
  local word out=""
  for word in "$@"; do
    out+="'${word//\'/\'\\\'\'}' "
  done
  printf '%s' "$out"
}

# Runs r_main MODE ARGS... on host $1 (stdin passed on); its output goes to stdout, its errors
# are reported with the host's name.
remote() {
  local i=$1 script cmd rc=0
  shift
  script="$(declare -f "${REMOTE_FUNCTIONS[@]}"); r_main \"\$@\""
  cmd="$(shell_quote bash -c "$script" sdp-deploy "$@")"
  cmd="if [ \"\$(id -u)\" -eq 0 ]; then $cmd; else sudo -n $cmd; fi"
  local port_args=()
  [ -z "${H_PORT[$i]}" ] || port_args=(-p "${H_PORT[$i]}")
  # Only `apply` reads stdin (the files to install); the rest must not eat the caller's.
  if [ "$1" = apply ]; then
    "${SSH[@]}" "${port_args[@]}" -- "${H_DEST[$i]}" "$cmd" 2>"$WORK/ssh.err" || rc=$?
  else
    "${SSH[@]}" "${port_args[@]}" -- "${H_DEST[$i]}" "$cmd" 2>"$WORK/ssh.err" </dev/null || rc=$?
  fi
  if [ "$rc" -eq 255 ]; then
    echo "deploy.sh: cannot log in to ${H_NAME[$i]} with a key over ssh; ssh said:" >&2
    sed 's/^/  /' "$WORK/ssh.err" >&2
    echo "deploy.sh: it logs in with keys only (BatchMode: no password, no prompt): check the host's address and port in the inventory, that your public key is in its authorized_keys, and that its host key is in your known_hosts" >&2
    exit 1
  elif [ "$rc" -ne 0 ]; then
    echo "deploy.sh: $1 failed on ${H_NAME[$i]}:" >&2
    sed 's/^/  /' "$WORK/ssh.err" >&2
    exit 1
  fi
}

dry_run=no
rollback=no
tarball=""
ssh_config=""
identity=""
inventory=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=yes ;;
    --rollback) rollback=yes ;;
    --tarball)
      [ $# -ge 2 ] || usage_error "--tarball needs a file"
      tarball=$2
      shift
      ;;
    --ssh-config)
      [ $# -ge 2 ] || usage_error "--ssh-config needs a file"
      ssh_config=$2
      shift
      ;;
    -i | --identity)
      [ $# -ge 2 ] || usage_error "--identity needs a file"
      identity=$2
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*) usage_error "unknown option $1" ;;
    *)
      [ -z "$inventory" ] || usage_error "one inventory only"
      inventory=$1
      ;;
  esac
  shift
done
[ -n "$inventory" ] || usage_error "name the inventory file"
[ -f "$inventory" ] || usage_error "no inventory file $inventory"
if [ -n "${SSHPASS+set}" ]; then
  usage_error "SSHPASS is set: deploy.sh logs in with ssh keys only and never uses a password; unset it"
fi

# The inventory, into arrays by host.
H_DEST=() H_PORT=() H_ROOT=() H_ROLES=() H_SITE=() H_CONF=() H_NAME=()
lineno=0
safe_path='^/[A-Za-z0-9._/-]*$'
while IFS= read -r line || [ -n "$line" ]; do
  lineno=$((lineno + 1))
  line=${line%%#*}
  read -r -a words <<<"$line"
  [ "${#words[@]}" -gt 0 ] || continue
  where="$inventory:$lineno"
  [ "${#words[@]}" -ge 2 ] || usage_error "$where: a host needs its roles (ssh-destination role[,role...] [key=value...])"
  dest=${words[0]}
  [[ $dest =~ ^[A-Za-z0-9._@%:-]+$ && $dest != -* ]] || usage_error "$where: '$dest' is not an ssh destination"
  roles=()
  IFS=, read -r -a given <<<"${words[1]}"
  for role in "${given[@]}"; do
    case $role in
      control | gateway | micro | nginx) roles+=("$role") ;;
      *) usage_error "$where: unknown role '$role' (control, gateway, micro, nginx)" ;;
    esac
  done
  port="" root="" site="" conf=/etc/nginx/nginx.conf
  for kv in "${words[@]:2}"; do
    key=${kv%%=*}
    value=${kv#*=}
    [ "$key" != "$kv" ] || usage_error "$where: '$kv' is not key=value"
    case $key in
      port)
        if ! [[ $value =~ ^[0-9]{1,5}$ ]] || [ "$value" -lt 1 ] || [ "$value" -gt 65535 ]; then
          usage_error "$where: port=$value is not a port"
        fi
        ;;
      prefix | nginx_site | nginx_conf)
        [[ $value =~ $safe_path && /$value/ != */../* ]] || usage_error "$where: $key=$value is not an absolute path of letters, digits, '.', '_', '-' and '/'"
        ;;
      *) usage_error "$where: unknown key '$key' (port, prefix, nginx_site, nginx_conf)" ;;
    esac
    case $key in
      port) port=$value ;;
      prefix) root=${value%/} ;;
      nginx_site) site=$value ;;
      nginx_conf) conf=$value ;;
    esac
  done
  has_nginx=no
  for role in "${roles[@]}"; do [ "$role" != nginx ] || has_nginx=yes; done
  if [ "$has_nginx" = yes ] && [ -z "$site" ]; then
    usage_error "$where: the nginx role needs nginx_site=FILE, the site to keep the sdp block in"
  fi
  name="$dest${port:+ port $port}${root:+ (prefix $root)}"
  for ((j = 0; j < ${#H_NAME[@]}; j++)); do
    [ "${H_NAME[$j]}" != "$name" ] || usage_error "$where: $name is named twice"
  done
  H_DEST+=("$dest") H_PORT+=("$port") H_ROOT+=("$root") H_ROLES+=("${roles[*]}")
  H_SITE+=("$site") H_CONF+=("$conf") H_NAME+=("$name")
done <"$inventory"
[ "${#H_DEST[@]}" -gt 0 ] || usage_error "$inventory names no host"

SSH=(ssh -o BatchMode=yes -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no
  -o PreferredAuthentications=publickey -o ConnectTimeout=15)
[ -z "$ssh_config" ] || SSH+=(-F "$ssh_config")
[ -z "$identity" ] || SSH+=(-i "$identity" -o IdentitiesOnly=yes)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The host's items, one a line, each destination once (control and gateway share a binary
# and a sysusers file: their units are joined).
host_items() {
  local role
  for role in ${H_ROLES[$1]}; do items_for_role "$role"; done |
    awk '{ if ($3 in seen) { if ($5 != "-") units[$3] = units[$3] "," $5 } else { seen[$3] = 1; order[++n] = $3; line[$3] = $1 " " $2 " " $3 " " $4; units[$3] = $5 } }
         END { for (k = 1; k <= n; k++) print line[order[k]] " " units[order[k]] }'
}

host_units() {
  local role
  for role in ${H_ROLES[$1]}; do
    case $role in
      control) echo sdp-server.service ;;
      gateway) echo sdp-agent-gateway.service ;;
      micro) echo sdp-agent-micro.service ;;
    esac
  done
}

# Restarts what each host has pending, unit by unit in RESTART_ORDER across all hosts.
restart_in_order() {
  local unit i
  for unit in "${RESTART_ORDER[@]}"; do
    for ((i = 0; i < ${#H_DEST[@]}; i++)); do
      grep -qxF "$unit" "$WORK/pending.$i" 2>/dev/null || continue
      echo "${H_NAME[$i]}:"
      remote "$i" restart "${H_ROOT[$i]}" "$unit"
    done
  done
}

if [ "$rollback" = yes ]; then
  # Every host must have a previous binary before any is touched.
  for ((i = 0; i < ${#H_DEST[@]}; i++)); do
    [ -n "$(host_units "$i")" ] || continue
    remote "$i" inspect "${H_ROOT[$i]}" >"$WORK/inspect.$i"
    grep -qx 'previous yes' "$WORK/inspect.$i" ||
      die "${H_NAME[$i]} has no previous binary (/usr/local/bin/sdp.previous) to roll back to: nothing was changed on any host"
  done
  for ((i = 0; i < ${#H_DEST[@]}; i++)); do
    mapfile -t units < <(host_units "$i")
    [ "${#units[@]}" -gt 0 ] || continue
    if [ "$dry_run" = yes ]; then
      echo "${H_NAME[$i]}:"
      echo "  to do: put /usr/local/bin/sdp.previous back in place, and restart ${units[*]}"
      continue
    fi
    echo "${H_NAME[$i]}:"
    remote "$i" rollback "${H_ROOT[$i]}" "${units[@]}"
    printf '%s\n' "${units[@]}" >"$WORK/pending.$i"
  done
  if [ "$dry_run" = yes ]; then
    echo "dry run: nothing was changed"
    exit 0
  fi
  restart_in_order
  echo "rolled back"
  exit 0
fi

# The release: one top folder sdp-<version>-x86_64-linux/ with sdp, deploy/ and SHA256SUMS,
# which must cover every other file and match each.
if [ -z "$tarball" ]; then
  tarball=$(find "$(dirname "$0")/../dist" -maxdepth 1 -name 'sdp-*-x86_64-linux.tar.gz' 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$tarball" ] || usage_error "no release in dist/: build one (scripts/build.sh) or name it with --tarball"
fi
[ -f "$tarball" ] || usage_error "no release tarball $tarball"
mkdir "$WORK/release"
tar -xzf "$tarball" -C "$WORK/release" || die "$tarball is not a readable .tar.gz"
mapfile -t tops < <(ls -A "$WORK/release")
if [ "${#tops[@]}" -ne 1 ] || ! [[ ${tops[0]} =~ ^sdp-[A-Za-z0-9.+_-]+-x86_64-linux$ ]] || [ ! -d "$WORK/release/${tops[0]}" ]; then
  die "$tarball must hold one folder sdp-<version>-x86_64-linux/ and nothing else"
fi
TOP="$WORK/release/${tops[0]}"
[ -f "$TOP/SHA256SUMS" ] || die "$tarball has no SHA256SUMS"
[ -z "$(find "$TOP" ! -type f ! -type d)" ] || die "$tarball holds something that is neither a file nor a folder"
(cd "$TOP" && sha256sum --check --strict --quiet SHA256SUMS) >"$WORK/sums.out" 2>&1 ||
  die "$tarball does not match its SHA256SUMS: $(cat "$WORK/sums.out")"
diff <(cd "$TOP" && find . -type f ! -path ./SHA256SUMS | sed 's|^\./||' | sort) \
  <(sed -E 's/^[0-9a-f]{64} [ *]//' "$TOP/SHA256SUMS" | sed 's|^\./||' | sort) >"$WORK/sums.diff" ||
  die "SHA256SUMS of $tarball does not list exactly the files it holds: $(cat "$WORK/sums.diff")"
expected_sum() {
  awk -v p="$1" '{ f = substr($0, 67); sub(/^\.\//, "", f) } f == p { print $1 }' "$TOP/SHA256SUMS"
}
BLOCK_SRC=deploy/nginx/sdp-locations.conf
BLOCK_SUM=$(render_block "$TOP/$BLOCK_SRC" | sha256sum | cut -d' ' -f1)
version=${tops[0]#sdp-}
echo "release ${version%-x86_64-linux}: checksums verified"

# Inspect every host, then plan: what differs is copied and installed, nothing else.
changed_hosts=0
for ((i = 0; i < ${#H_DEST[@]}; i++)); do
  host_items "$i" >"$WORK/items.$i"
  args=()
  while read -r kind src dst mode units; do
    args+=("file=$dst")
    [ "$kind" != config ] || [[ $dst != *.env ]] || args+=("token=$dst=$(token_var "$dst")")
  done <"$WORK/items.$i"
  [ -z "${H_SITE[$i]}" ] || args+=("nginx=${H_SITE[$i]}")
  remote "$i" inspect "${H_ROOT[$i]}" "${args[@]}" >"$WORK/inspect.$i"

  : >"$WORK/manifest.$i"
  : >"$WORK/restarts.$i"
  plan=()
  files=()
  while read -r kind src dst mode units; do
    want=$(expected_sum "$src")
    have=$(awk -v d="$dst" '$1 == "file" && $2 == d { print $3 }' "$WORK/inspect.$i")
    case $kind in
      bin) [ "$have" != "$want" ] || continue
        plan+=("binary $dst: $([ "$have" = - ] && echo install || echo "replace (the one before kept as $dst.previous)")") ;;
      unit | sysusers) [ "$have" != "$want" ] || continue
        plan+=("$kind $dst: $([ "$have" = - ] && echo install || echo replace)") ;;
      config) [ "$have" = - ] || continue
        plan+=("config $dst: create from the example (mode $mode)") ;;
    esac
    echo "$kind $want $src $dst $mode $units" >>"$WORK/manifest.$i"
    files+=("$src")
    [ "$units" = - ] || echo "$units" | tr , '\n' >>"$WORK/restarts.$i"
  done <"$WORK/items.$i"
  if [ -n "${H_SITE[$i]}" ]; then
    have=$(awk '$1 == "nginx" { print $3 }' "$WORK/inspect.$i")
    case $have in
      missing) die "${H_NAME[$i]}: the nginx site ${H_SITE[$i]} does not exist: install the reference site (deploy/nginx/sdp.conf, with your names and certificates) there, or name your own site in nginx_site" ;;
      broken) die "${H_NAME[$i]}: ${H_SITE[$i]} has '# BEGIN sdp' and '# END sdp' lines that are not one pair in order: fix them by hand" ;;
      "$BLOCK_SUM") ;;
      *)
        plan+=("nginx site ${H_SITE[$i]}: $([ "$have" = none ] && echo "splice in" || echo update) the sdp block (after a backup), then nginx -t and a reload")
        echo "nginx $(expected_sum "$BLOCK_SRC") $BLOCK_SRC ${H_SITE[$i]} ${H_CONF[$i]} -" >>"$WORK/manifest.$i"
        files+=("$BLOCK_SRC")
        ;;
    esac
  fi
  pending=$(awk '$1 == "pending" { print $2 }' "$WORK/inspect.$i" | tr '\n' ' ')
  [ -z "$pending" ] || plan+=("finish the restarts of an earlier run: $pending")
  awk '$1 == "pending" { print $2 }' "$WORK/inspect.$i" >>"$WORK/restarts.$i"
  restarts=()
  for unit in "${RESTART_ORDER[@]}"; do
    if grep -qxF "$unit" "$WORK/restarts.$i"; then restarts+=("$unit"); fi
  done

  echo "${H_NAME[$i]} [${H_ROLES[$i]// /,}]:"
  while read -r what dst state; do
    [ "$what" = token ] || continue
    [ "$state" != set ] || continue
    echo "  warning: $dst has no $(token_var "$dst")= line yet: put the token there (the file stays 0600), or its unit will not start"
  done <"$WORK/inspect.$i"
  if [ "${#plan[@]}" -eq 0 ]; then
    echo "  nothing to do"
    continue
  fi
  changed_hosts=$((changed_hosts + 1))
  if [ "$dry_run" = yes ]; then
    printf '  to do: %s\n' "${plan[@]}"
    if [ "${#restarts[@]}" -gt 0 ]; then echo "  to do: restart ${restarts[*]} (control planes first, across hosts)"; fi
    continue
  fi
  if [ -s "$WORK/manifest.$i" ]; then
    mkdir "$WORK/upload.$i"
    cp "$WORK/manifest.$i" "$WORK/upload.$i/manifest"
    tar -cf - -C "$WORK/upload.$i" manifest -C "$TOP" "${files[@]}" | remote "$i" apply "${H_ROOT[$i]}"
  fi
  remote "$i" inspect "${H_ROOT[$i]}" | awk '$1 == "pending" { print $2 }' >"$WORK/pending.$i"
  for unit in "${RESTART_ORDER[@]}"; do
    if grep -qxF "$unit" "$WORK/pending.$i"; then echo "  to restart: $unit"; fi
  done
done

if [ "$dry_run" = yes ]; then
  echo "dry run: nothing was changed"
  exit 0
fi
if [ "$changed_hosts" -eq 0 ]; then
  echo "nothing to do: every host is up to date"
  exit 0
fi
restart_in_order
echo "done: $changed_hosts host(s) changed"
