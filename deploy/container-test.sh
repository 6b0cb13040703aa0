#!/usr/bin/env bash
# The container image and the compose cluster, and the systemd unit under systemd as PID 1,
# against the real tools (issue 19). Installs what it needs from apt when run as root;
# deploy/test.sh calls it.
#
# - Base images: nothing can be pulled here, so the runtime base is Debian bookworm made by
#   `mmdebstrap --variant=minbase` and `docker import`, and the builder is the same with gcc,
#   this machine's Rust toolchain and its cargo registry (the build runs offline:
#   CARGO_NET_OFFLINE). Both are kept between runs, the builder tagged by Cargo.lock and rustc.
# - deploy/Containerfile builds with them (BUILDER, BASE build arguments; PROFILE=dev here to
#   keep CI short, IMAGE_PROFILE=release for the users' build).
# - deploy/compose.yaml brings up its three nodes (keys made by its `keys` service, mutual TLS
#   and a cluster key between members); all three report healthy (the image's health check,
#   `shadowcache status`). From the host, the sealed replica is read through NBD on the ports
#   compose publishes, of both members and the owner, and `qemu-img compare` finds it
#   identical to the file. The members' metrics show the reads came from the cluster (owner
#   and peers), none from an origin, and a second read from their caches.
# - `compose down -v` leaves no container, volume or network of the project behind.
# - systemd: an image with systemd (mmdebstrap, `podman import`) holding the binaries, the
#   unit and sysusers file from deploy/systemd, and a config; `podman run --systemd=always`
#   boots it. The unit (Type=notify) reaches active, `shadowcache status` answers on its
#   socket, a sealed disk reads back identical, `systemctl reload` keeps it active, and
#   `systemctl stop` ends it with result `success`.
#
# Bounded: every wait has a deadline; the compose project, the podman container and a dockerd
# started here are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
SCRIPT=deploy/container-test.sh
# shellcheck source=deploy/lib.sh
. deploy/lib.sh

need dockerd:docker.io docker:docker.io docker-compose:docker-compose mmdebstrap:mmdebstrap \
  podman:podman qemu-img:qemu-utils curl:curl
[ "$(id -u)" = 0 ] || fail "needs root (dockerd, podman with systemd, mmdebstrap)"

bin=target/debug
if [ ! -x "$bin/shadowcache-node" ] || [ ! -x "$bin/shadowcache" ]; then
  cargo build -q -p shadowcache-node -p shadowcache-client
fi

work=$(mktemp -d)
project="sctest$$"
compose_env=()
compose_up=""
started_dockerd=""
podman_ctr=""

compose() {
  env "${compose_env[@]}" "${compose_cmd[@]}" -p "$project" -f deploy/compose.yaml "$@"
}

cleanup() {
  set +e
  if [ -n "$compose_up" ]; then
    compose down -v --timeout 10 >/dev/null 2>&1
  fi
  [ -n "$podman_ctr" ] && podman rm -f -t 5 "$podman_ctr" >/dev/null 2>&1
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null
    wait "$started_dockerd" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

wait_for() { # SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "$what: not within ${secs}s"
    sleep 1
  done
}

echo "== docker: the daemon"
if ! docker info >/dev/null 2>&1; then
  mkdir -p target
  dockerd >target/dockerd.log 2>&1 &
  started_dockerd=$!
  wait_for 60 "dockerd to answer (target/dockerd.log)" docker info
fi
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  compose_cmd=(docker-compose)
fi

echo "== base images (mmdebstrap bookworm, imported)"
base=local/shadowcache-base:bookworm
if ! docker image inspect "$base" >/dev/null 2>&1; then
  mmdebstrap --variant=minbase --quiet bookworm - | docker import - "$base" >/dev/null
fi
toolchain=$(rustc --print sysroot)
lock=$(cat Cargo.lock <(rustc -V) | sha256sum | cut -c1-12)
builder="local/shadowcache-builder:$lock"
if ! docker image inspect "$builder" >/dev/null 2>&1; then
  # Cargo's registry (the index and the .crate files) makes the build offline; anything the
  # lock file needs is there, since the workspace was built on this machine.
  cargo fetch --locked -q
  registry="${CARGO_HOME:-$HOME/.cargo}/registry"
  mmdebstrap --variant=minbase --quiet --include=gcc,libc6-dev,ca-certificates \
    --customize-hook="mkdir -p \"\$1/usr/local/rust\" \"\$1/usr/local/cargo/registry\"" \
    --customize-hook="cp -a '$toolchain/bin' '$toolchain/lib' \"\$1/usr/local/rust/\"" \
    --customize-hook="cp -a '$registry/index' '$registry/cache' \"\$1/usr/local/cargo/registry/\"" \
    bookworm - \
    | docker import \
      --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV CARGO_HOME=/usr/local/cargo' \
      --change 'ENV CARGO_NET_OFFLINE=true' \
      --change 'ENV CARGO_INCREMENTAL=0' \
      --change 'ENV CARGO_PROFILE_DEV_DEBUG=0' \
      - "$builder" >/dev/null
fi

# Images of earlier lock files are of no use again.
for old in $(docker images --format '{{.Repository}}:{{.Tag}}' | grep -E '^(local/shadowcache-builder|shadowcache):(test-)?[0-9a-f]{12}$' | grep -v "$lock" || true); do
  docker rmi "$old" >/dev/null 2>&1 || true
done

echo "== deploy/Containerfile: build"
image="shadowcache:test-$lock"
t0=$SECONDS
docker build -q -f deploy/Containerfile --build-arg "BUILDER=$builder" --build-arg "BASE=$base" \
  --build-arg "PROFILE=${IMAGE_PROFILE:-dev}" -t "$image" . >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; fail "docker build"; }
echo "image $image built in $((SECONDS - t0))s ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MiB", $1/1048576}'))"
[ "$(docker image inspect -f '{{.Config.User}}' "$image")" = "10001:10001" ] || fail "the image does not run as user 10001"
docker run --rm "$image" --version | grep -q '^shadowcache-node ' || fail "the image's node does not run"

echo "== deploy/compose.yaml: a 3-node cluster"
mkdir -p "$work/images"
head -c $((24 << 20)) /dev/urandom >"$work/images/replica.raw"
# 1 MiB of zeroes in the middle: blocks the content map knows as zero never cross the network.
dd if=/dev/zero of="$work/images/replica.raw" bs=1M seek=8 count=1 conv=notrunc status=none
declare -A nbd metrics
for n in 1 2 3; do
  nbd[$n]=$(free_port)
  metrics[$n]=$(free_port)
  compose_env+=("SHADOWCACHE_NBD_PORT_$n=${nbd[$n]}" "SHADOWCACHE_METRICS_PORT_$n=${metrics[$n]}")
done
# A /24 no docker network of this host uses.
used=$(docker network ls -q | xargs docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' 2>/dev/null || true)
net=""
for third in $(seq 80 120); do
  case " $used " in *" 172.29.$third.0/24 "*) continue ;; esac
  net="172.29.$third"
  break
done
[ -n "$net" ] || fail "no free 172.29.x.0/24 for the compose network"
compose_env+=("SHADOWCACHE_IMAGE=$image" "SHADOWCACHE_IMAGES=$work/images" "SHADOWCACHE_NET=$net")
t0=$SECONDS
compose_up=1
compose up -d --no-build >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; fail "compose up"; }
healthy() {
  for s in node-1 node-2 node-3; do
    local id
    id=$(compose ps -q "$s")
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] || return 1
  done
}
wait_for 120 "three healthy nodes" healthy
members() {
  compose exec -T node-3 shadowcache status --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if len(s.get("members", [])) == 3 else 1)'
}
wait_for 60 "node-3 to see three members" members
echo "cluster up and healthy in $((SECONDS - t0))s"
# The members know the replica once the owner's disk list reached them.
knows() { compose exec -T "$1" shadowcache stat replica; }
wait_for 60 "node-2 to know the replica" knows node-2
wait_for 60 "node-3 to know the replica" knows node-3

for n in 2 3 1; do
  qemu-img compare -q -f raw -F raw "nbd://127.0.0.1:${nbd[$n]}/replica" "$work/images/replica.raw" \
    || fail "node-$n's NBD does not read the replica as its file"
done
echo "qemu-img compare: the replica read through node-2, node-3 and node-1 is identical to its file"
for n in 2 3; do
  origin=$(metric_sum "${metrics[$n]}" shadowcache_origin_read_bytes_total)
  owner=$(metric_sum "${metrics[$n]}" shadowcache_owner_read_bytes_total)
  peers=$(metric_sum "${metrics[$n]}" shadowcache_peer_read_bytes_total)
  echo "node-$n: from the owner $owner B, from peers $peers B, from an origin $origin B"
  [ "$origin" = 0 ] || fail "node-$n read an origin; it owns none"
  [ $((owner + peers)) -gt 0 ] || fail "node-$n fetched nothing from the cluster"
done
hits_before=$(metric_sum "${metrics[2]}" shadowcache_cache_hit_bytes_total)
fetched_before=$(( $(metric_sum "${metrics[2]}" shadowcache_owner_read_bytes_total) + $(metric_sum "${metrics[2]}" shadowcache_peer_read_bytes_total) ))
qemu-img compare -q -f raw -F raw "nbd://127.0.0.1:${nbd[2]}/replica" "$work/images/replica.raw" \
  || fail "node-2's second read differs"
hits=$(( $(metric_sum "${metrics[2]}" shadowcache_cache_hit_bytes_total) - hits_before ))
fetched=$(( $(metric_sum "${metrics[2]}" shadowcache_owner_read_bytes_total) + $(metric_sum "${metrics[2]}" shadowcache_peer_read_bytes_total) - fetched_before ))
echo "node-2, second read: $hits B from its cache, $fetched B fetched"
[ "$hits" -ge $((23 << 20)) ] || fail "node-2's second read was not served from its cache ($hits B)"
[ "$fetched" = 0 ] || fail "node-2 fetched $fetched B again"

echo "== compose down -v leaves nothing behind"
compose down -v --timeout 30 >"$work/down.log" 2>&1 || { cat "$work/down.log" >&2; fail "compose down"; }
label="label=com.docker.compose.project=$project"
left="$(docker ps -aq --filter "$label") $(docker volume ls -q --filter "$label") $(docker network ls -q --filter "$label")"
[ -z "${left// /}" ] || fail "left behind after down: $left"
compose_up=""
echo "no container, volume or network of project $project is left"

echo "== systemd: the unit under systemd as PID 1 (podman --systemd=always)"
# Podman's default open-file limit is above what this machine allows a container.
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]
EOF
export CONTAINERS_CONF="$work/containers.conf"
sys_image="localhost/shadowcache-systemd:test-$lock"
head -c $((4 << 20)) /dev/urandom >"$work/base.raw"
cat >"$work/node.toml" <<'EOF'
data_dir = "/var/lib/shadowcache"
listen_unix = "/run/shadowcache/shadowcache.sock"
nbd_unix = "/run/shadowcache/nbd.sock"
log_filter = "info"
[cache]
ram = "64MiB"
ssd = "16MiB"
[[disk]]
id = "base"
origin = "/srv/images/base.raw"
mode = "sealed"
EOF
here=$(pwd)
mmdebstrap --variant=minbase --quiet --include=systemd,systemd-sysv,dbus \
  --customize-hook="cp '$here/$bin/shadowcache-node' '$here/$bin/shadowcache' \"\$1/usr/bin/\"" \
  --customize-hook="cp '$here/deploy/systemd/shadowcache-node.service' \"\$1/etc/systemd/system/\"" \
  --customize-hook="cp '$here/deploy/systemd/shadowcache.sysusers' \"\$1/usr/lib/sysusers.d/shadowcache.conf\"" \
  --customize-hook="mkdir -p \"\$1/etc/shadowcache\" \"\$1/srv/images\" && cp '$work/node.toml' \"\$1/etc/shadowcache/\" && cp '$work/base.raw' \"\$1/srv/images/\"" \
  --customize-hook="chroot \"\$1\" systemctl enable shadowcache-node.service" \
  bookworm - | podman import -q - "$sys_image" >/dev/null
podman_ctr="shadowcache-systemd-$$"
podman run -d --name "$podman_ctr" --systemd=always --cap-add SYS_ADMIN "$sys_image" /sbin/init >/dev/null
in_ctr() { podman exec "$podman_ctr" "$@"; }
t0=$SECONDS
active() { [ "$(in_ctr systemctl is-active shadowcache-node)" = active ]; }
wait_for 90 "shadowcache-node.service to become active" active
echo "unit active $((SECONDS - t0))s after the container started"
[ "$(in_ctr systemctl show -p Type --value shadowcache-node)" = notify ] || fail "the unit is not Type=notify"
status=$(in_ctr shadowcache --socket /run/shadowcache/shadowcache.sock status) \
  || fail "shadowcache status: $(in_ctr journalctl -u shadowcache-node --no-pager | tail -20)"
echo "$status" | grep -q '^base ' || fail "status does not list the disk: $status"
in_ctr shadowcache --socket /run/shadowcache/shadowcache.sock read base --offset 0 --length $((4 << 20)) -o /tmp/base.read
in_ctr cmp /srv/images/base.raw /tmp/base.read || fail "the disk read back differs"
[ "$(in_ctr stat -c '%U:%G %a' /run/shadowcache)" = "shadowcache:shadowcache 750" ] \
  || fail "runtime directory: $(in_ctr stat -c '%U:%G %a' /run/shadowcache)"
in_ctr systemctl reload shadowcache-node
reloaded() { in_ctr journalctl -u shadowcache-node --no-pager | grep -q 'SIGHUP: log filter reloaded'; }
wait_for 20 "the reload in the journal" reloaded
active || fail "not active after reload"
in_ctr systemctl stop shadowcache-node
result=$(in_ctr systemctl show -p Result --value shadowcache-node)
[ "$result" = success ] || fail "stop: result $result: $(in_ctr journalctl -u shadowcache-node --no-pager | tail -10)"
podman rm -f -t 5 "$podman_ctr" >/dev/null
podman_ctr=""
podman rmi "$sys_image" >/dev/null
echo "systemd: active (Type=notify), status served, disk read back, reload kept it active, stop: $result"
echo "deploy/container-test.sh: all passed"
