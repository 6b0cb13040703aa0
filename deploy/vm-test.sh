#!/usr/bin/env bash
# A real VM boots through the cluster. Installs what it needs from apt when run as root;
# deploy/test.sh calls it.
#
# - Three nodes on loopback (the debug binaries, built if missing), with a shared cluster
#   secret: node a owns the disk `root` (sealed; its origin a raw ext4 image), b and c are
#   members that own nothing.
# - The image is built by the host without mounting (`mke2fs -d`): a static busybox, an
#   /sbin/init, a few MiB of random data files and SHA256SUMS, their checksums.
# - qemu-system-x86_64 (TCG; VM_TEST_ACCEL=kvm for KVM) boots Debian's cloud kernel (its .deb
#   fetched with `apt-get download`, cached under target/vm-test-cache/) with a busybox
#   initramfs that loads the virtio modules and switch_roots into /dev/vda: the ROOT DISK is a
#   linked clone (a qcow2 overlay) whose backing file is `root` read over NBD from a member's
#   Unix socket, a node that does not own it. The guest's init checks every file against
#   SHA256SUMS, prints one line per file and a result line on the serial console and powers
#   off; the host fails unless every file was read back with the checksum the host wrote.
# - Boot 1 through c (cold: blocks come from the owner, or from b as their home), boot 2
#   through b (b fetches from its peer c what it lacks), boot 3 through b again (served from
#   b's own cache). b's metrics must show it: bytes from peers in boot 2, cache hits and no
#   block bytes from the owner or peers in boot 3; the owner sent less for the three boots than
#   one boot reads (each block leaves it about once). The figures of each boot are printed.
#
# Bounded: every wait has a deadline, each qemu run is under `timeout`; the nodes are stopped
# on exit. A missing qemu-system-x86_64 that cannot be installed is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
SCRIPT=deploy/vm-test.sh
# shellcheck source=deploy/lib.sh
. deploy/lib.sh

boot_timeout=${VM_TEST_BOOT_TIMEOUT:-180}
# TCG by default: it runs everywhere, and this boot takes seconds under it. KVM
# (VM_TEST_ACCEL=kvm) where /dev/kvm really works: a /dev/kvm that opens but cannot run the
# guest (nested, emulated) stops the guest with "KVM internal error", no fallback to TCG.
accel=${VM_TEST_ACCEL:-tcg}
cache_dir=target/vm-test-cache

need qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils mke2fs:e2fsprogs dumpe2fs:e2fsprogs \
  curl:curl cpio:cpio depmod:kmod modprobe:kmod dpkg-deb:dpkg gzip:gzip timeout:coreutils
command -v apt-get >/dev/null 2>&1 || [ -d "$cache_dir" ] || fail "no apt-get to fetch the kernel and busybox with"

bin=target/debug
if [ ! -x "$bin/shadowcache-node" ] || [ ! -x "$bin/shadowcache" ]; then
  cargo build -q -p shadowcache-node -p shadowcache-client
fi

work=$(mktemp -d)
pids=()
ok=0
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$ok" != 1 ]; then
    for n in a b c; do
      if [ -f "$work/$n.log" ]; then
        echo "--- node $n log (last 15 lines)" >&2
        tail -15 "$work/$n.log" >&2
      fi
    done
  fi
  if [ "$ok" != 1 ] && [ -n "${VM_TEST_KEEP:-}" ]; then
    echo "deploy/vm-test.sh: work directory kept: $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

# `apt-get download PKG` into DIR; as root, the lists are refreshed once when the package is
# unknown.
apt_download() {
  local pkg=$1 dir=$2
  mkdir -p "$dir"
  # apt drops to the _apt user when it can; a directory it cannot write only costs a warning.
  if ! (cd "$dir" && apt-get download -qq "$pkg" 2> "$work/apt.err"); then
    [ "$(id -u)" = 0 ] || { cat "$work/apt.err" >&2; fail "apt-get download $pkg failed"; }
    apt-get update -qq
    (cd "$dir" && apt-get download -qq "$pkg" 2> "$work/apt.err") \
      || { cat "$work/apt.err" >&2; fail "apt-get download $pkg failed"; }
  fi
}

echo "== kernel: Debian's cloud kernel and the modules the root disk needs"
mkdir -p "$cache_dir"
kdir=""
for d in "$cache_dir"/kernel-*; do
  [ -f "$d/complete" ] && kdir=$d
done
if [ -z "$kdir" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || fail "apt knows no linux-image-cloud-amd64 (a Debian apt source is needed)"
  rm -rf "$cache_dir/debs" "$cache_dir/extract"
  apt_download "$pkg" "$cache_dir/debs"
  dpkg-deb -x "$cache_dir"/debs/"$pkg"_*.deb "$cache_dir/extract"
  vmlinuz=("$cache_dir"/extract/boot/vmlinuz-*)
  [ -f "${vmlinuz[0]}" ] || fail "no /boot/vmlinuz-* in $pkg"
  kver=${vmlinuz[0]##*/vmlinuz-}
  depmod -b "$cache_dir/extract" "$kver"
  kdir="$cache_dir/kernel-$kver"
  rm -rf "$kdir"
  mkdir -p "$kdir/modules"
  cp "$cache_dir/extract/boot/vmlinuz-$kver" "$kdir/vmlinuz"
  cp "$cache_dir/extract/boot/config-$kver" "$kdir/config"
  # What is built in needs nothing; what is a module is loaded with its dependencies first, in
  # the order modprobe gives (modules.dep).
  i=0
  : > "$kdir/modules/order"
  for m in virtio_pci virtio_blk ext4; do
    modprobe -d "$cache_dir/extract" -S "$kver" --show-depends "$m" > "$work/deps" \
      || fail "modprobe --show-depends $m found nothing in $pkg"
    while read -r verb path _; do
      [ "$verb" = insmod ] || continue
      name=$(basename "$path")
      grep -qx "[0-9]*-${name%%.ko*}.ko" "$kdir/modules/order" && continue
      i=$((i + 1))
      out=$(printf '%02d-%s.ko' "$i" "${name%%.ko*}")
      case "$name" in
        *.ko) cp "$path" "$kdir/modules/$out" ;;
        *.ko.xz) xz -dc "$path" > "$kdir/modules/$out" ;;
        *.ko.zst) zstd -qdc "$path" > "$kdir/modules/$out" ;;
        *.ko.gz) gzip -dc "$path" > "$kdir/modules/$out" ;;
        *) fail "unknown module file $path" ;;
      esac
      echo "$out" >> "$kdir/modules/order"
    done < "$work/deps"
  done
  echo "$pkg" > "$kdir/package"
  touch "$kdir/complete"
  rm -rf "$cache_dir/debs" "$cache_dir/extract"
fi
kver=${kdir##*/kernel-}
echo "kernel $kver ($(cat "$kdir/package")); modules to load: $(tr '\n' ' ' < "$kdir/modules/order")"
grep -E '^CONFIG_(VIRTIO_PCI|VIRTIO_BLK|EXT4_FS)=' "$kdir/config" | tr '\n' ' '
echo

echo "== busybox (static)"
bb=$(command -v busybox || true)
if [ -z "$bb" ] || ldd "$bb" >/dev/null 2>&1; then
  # None, or a dynamic one: the static build from its Debian package, cached.
  bb="$cache_dir/busybox-static/busybox"
  if [ ! -x "$bb" ]; then
    rm -rf "$cache_dir/busybox-deb"
    apt_download busybox-static "$cache_dir/busybox-deb"
    dpkg-deb -x "$cache_dir"/busybox-deb/busybox-static_*.deb "$cache_dir/busybox-deb/x"
    mkdir -p "$cache_dir/busybox-static"
    cp "$cache_dir/busybox-deb/x/bin/busybox" "$bb.tmp" && mv "$bb.tmp" "$bb"
    rm -rf "$cache_dir/busybox-deb"
  fi
fi
ldd "$bb" >/dev/null 2>&1 && fail "$bb is not a static busybox"
echo "$bb: $("$bb" | head -1)"

# A directory tree with busybox and a link for each applet.
busybox_tree() {
  mkdir -p "$1/bin" "$1/sbin" "$1/proc" "$1/sys" "$1/dev" "$1/tmp"
  cp "$bb" "$1/bin/busybox"
  for a in $("$bb" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$1/bin/$a"
  done
}

echo "== root filesystem: ext4 image with busybox, /sbin/init, data files and SHA256SUMS"
root=$work/rootfs
busybox_tree "$root"
mkdir -p "$root/data"
sizes=(4194304 3145728 2097152 1048576 524288 262143 37 4097 1000000 2500000)
for i in "${!sizes[@]}"; do
  head -c "${sizes[$i]}" /dev/urandom > "$root/data/file$i.bin"
done
# Two files with the same bytes: the cache keeps them once (content addressed).
cp "$root/data/file1.bin" "$root/data/file1-copy.bin"
(cd "$root" && sha256sum data/* > SHA256SUMS)
nfiles=$(wc -l < "$root/SHA256SUMS")
cat > "$root/sbin/init" <<'EOF'
#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
echo "vmtest: root $(grep ' / ' /proc/mounts | head -1)"
n=0
good=0
while read -r want name; do
  n=$((n + 1))
  got=$(sha256sum "/$name" | cut -d' ' -f1)
  if [ -n "$got" ] && [ "$got" = "$want" ]; then
    good=$((good + 1))
    echo "vmtest: file $name $got OK"
  else
    echo "vmtest: file $name ${got:-unreadable} FAILED"
  fi
done < /SHA256SUMS
if [ "$n" -gt 0 ] && [ "$good" = "$n" ]; then
  echo "vmtest: result OK $good/$n uptime $(cut -d' ' -f1 /proc/uptime)s"
else
  echo "vmtest: result FAIL $good/$n"
fi
poweroff -f
EOF
chmod 755 "$root/sbin/init"
image=$work/root.ext4
mke2fs -q -F -t ext4 -L vmroot -d "$root" "$image" 64M > "$work/mke2fs.out" 2>&1 \
  || { cat "$work/mke2fs.out" >&2; fail "mke2fs -d could not build the image"; }
e2fsck -fn "$image" >/dev/null 2>&1 || fail "e2fsck finds the image broken"
used=$(dumpe2fs -h "$image" 2>/dev/null | awk -F: '
  /^Block count/ {c = $2} /^Free blocks/ {f = $2} /^Block size/ {s = $2}
  END {printf "%.0f", (c - f) * s}')
data_bytes=$(cat "$root"/data/* | wc -c)
echo "image $(($(stat -c %s "$image") >> 20)) MiB, $((used >> 10)) KiB used; $nfiles files, $data_bytes bytes of data"

echo "== initramfs: load the virtio modules, mount /dev/vda read-only, switch_root"
initdir=$work/initramfs
busybox_tree "$initdir"
mkdir -p "$initdir/modules" "$initdir/newroot"
cp "$kdir/modules/order" "$initdir/modules/"
while read -r m; do cp "$kdir/modules/$m" "$initdir/modules/"; done < "$kdir/modules/order"
cat > "$initdir/init" <<'EOF'
#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
die() {
  echo "vmtest: result FAIL ($*)"
  poweroff -f
}
for m in $(cat /modules/order); do
  insmod "/modules/$m" || die "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ "$i" -le 300 ] || die "no /dev/vda after 30 s"
  sleep 0.1
done
mount -t ext4 -o ro /dev/vda /newroot || die "mount /dev/vda"
echo "vmtest: /dev/vda mounted, switching root"
umount /sys /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$initdir/init"
initrd=$work/initrd.gz
(cd "$initdir" && find . | cpio -o -H newc --quiet | gzip -1) > "$initrd"

echo "== three nodes: a owns root (sealed), b and c are members"
head -c 32 /dev/urandom > "$work/cluster.secret"
chmod 600 "$work/cluster.secret"
declare -A peer metrics
for n in a b c; do
  peer[$n]=$(free_port)
  metrics[$n]=$(free_port)
done
for n in a b c; do
  {
    echo "node_id = \"$n\""
    echo "data_dir = \"$work/$n\""
    echo "metrics = \"127.0.0.1:${metrics[$n]}\""
    echo "[cache]"
    echo "ram = \"64MiB\""
    echo "ssd = \"64MiB\""
    echo "[cluster]"
    echo "peer_listen = \"127.0.0.1:${peer[$n]}\""
    echo "secret_file = \"$work/cluster.secret\""
    [ "$n" = a ] || echo "seeds = [\"127.0.0.1:${peer[a]}\"]"
    if [ "$n" = a ]; then
      echo "[[disk]]"
      echo "id = \"root\""
      echo "origin = \"$image\""
      echo "mode = \"sealed\""
    fi
  } > "$work/$n.toml"
  "$bin/shadowcache-node" --check-config --config "$work/$n.toml" >/dev/null
  "$bin/shadowcache-node" --config "$work/$n.toml" > "$work/$n.log" 2>&1 &
  pids+=($!)
done

# The sum of every series of a metric on node $1 (0 when it has none yet).
metric() { metric_sum "${metrics[$1]}" "$2"; }
# Wait up to $1 seconds for the command after it to succeed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
ready() { [ -S "$work/$1/nbd.sock" ] && [ -S "$work/$1/shadowcache.sock" ] && curl -sf --max-time 2 "http://127.0.0.1:${metrics[$1]}/metrics" >/dev/null; }
members() { [ "$(metric "$1" shadowcache_members_alive)" = 3 ]; }
export_root() { qemu-img info -U "nbd+unix:///root?socket=$work/$1/nbd.sock"; }
for n in a b c; do
  wait_for 30 ready "$n" || fail "node $n did not open its sockets and metrics in 30 s"
done
for n in a b c; do
  wait_for 60 members "$n" || fail "node $n does not see 3 live members after 60 s"
done
for n in b c; do
  wait_for 60 export_root "$n" || fail "member $n does not serve the export root after 60 s"
done
echo "cluster up: 3 members; b and c serve root over NBD"

# Boot the VM through node $1's NBD socket; $2 names the run.
declare -A before after
counters=(shadowcache_cache_hit_bytes_total shadowcache_peer_read_bytes_total
  shadowcache_owner_read_bytes_total shadowcache_origin_read_bytes_total
  shadowcache_zero_block_hits_total shadowcache_peer_served_bytes_total
  shadowcache_owner_map_bytes_total)
snapshot() {
  local n c v
  for n in a b c; do
    for c in "${counters[@]}"; do
      v=$(metric "$n" "$c")
      if [ "$1" = before ]; then before[$n.$c]=$v; else after[$n.$c]=$v; fi
    done
  done
}
delta() { echo $((after[$1.$2] - before[$1.$2])); }
boot_seconds=()
boot() {
  local node=$1 run=$2
  local log=$work/serial-$run.log clone=$work/clone-$run.qcow2
  echo "== boot $run: the VM's root disk is a linked clone of root read through node $node"
  qemu-img create -q -f qcow2 -F raw -b "nbd+unix:///root?socket=$work/$node/nbd.sock" "$clone"
  snapshot before
  local start rc=0
  start=$(date +%s%N)
  timeout "$boot_timeout" qemu-system-x86_64 -machine "pc,accel=$accel" -m 256 -smp 1 \
    -nodefaults -display none -no-reboot -serial "file:$log" \
    -kernel "$kdir/vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 root=/dev/vda ro panic=-1 loglevel=4" \
    -drive "file=$clone,if=virtio,format=qcow2" > "$work/qemu-$run.out" 2>&1 || rc=$?
  local took
  took=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN {printf "%.1f", (b - a) / 1e9}')
  boot_seconds+=("$took")
  snapshot after
  if [ "$rc" = 124 ]; then
    tail -20 "$log" >&2 || true
    fail "boot $run through $node did not power off within $boot_timeout s"
  fi
  if [ "$rc" != 0 ]; then
    cat "$work/qemu-$run.out" >&2
    tail -20 "$log" >&2 || true
    fail "qemu exited $rc in boot $run"
  fi
  # Every file, with the checksum the host wrote, and nothing failed.
  local good=0
  while read -r sum name; do
    if tr -d '\r' < "$log" | grep -qx "vmtest: file $name $sum OK"; then
      good=$((good + 1))
    else
      echo "boot $run: no OK line for $name ($sum)" >&2
    fi
  done < "$root/SHA256SUMS"
  if [ "$good" != "$nfiles" ] || ! tr -d '\r' < "$log" | grep -q "^vmtest: result OK $nfiles/$nfiles "; then
    tail -30 "$log" >&2
    fail "boot $run through $node: the guest did not read every file back ($good/$nfiles OK)"
  fi
  if grep -q FAILED "$log"; then
    grep FAILED "$log" >&2
    fail "boot $run through $node: the guest reported a failure"
  fi
  local result
  result=$(tr -d '\r' < "$log" | grep '^vmtest: result' | head -1)
  echo "guest: ${result#vmtest: } ($(grep -c '^vmtest: file' "$log") file lines); qemu ($accel) ran ${took} s"
  echo "node $node: from cache $(delta "$node" shadowcache_cache_hit_bytes_total) B," \
    "from peers $(delta "$node" shadowcache_peer_read_bytes_total) B," \
    "from owner $(delta "$node" shadowcache_owner_read_bytes_total) B," \
    "zero-block hits $(delta "$node" shadowcache_zero_block_hits_total);" \
    "owner a: origin reads $(delta a shadowcache_origin_read_bytes_total) B, sent $(delta a shadowcache_peer_served_bytes_total) B"
}

boot c 1
peer1=$(delta c shadowcache_peer_read_bytes_total)
owner1=$(delta c shadowcache_owner_read_bytes_total)
hit1=$(delta c shadowcache_cache_hit_bytes_total)
read1=$((peer1 + owner1 + hit1))
[ $((peer1 + owner1)) -gt 0 ] || fail "boot 1: c got no block bytes from the owner or peers (was it served at all?)"
[ "$read1" -ge "$data_bytes" ] \
  || fail "boot 1: c served $read1 B of blocks, less than the $data_bytes B of data the guest read"

# b learns what c holds from c's block map (changes every 250 ms).
sleep 1
boot b 2
peer2=$(delta b shadowcache_peer_read_bytes_total)
owner2=$(delta b shadowcache_owner_read_bytes_total)
hit2=$(delta b shadowcache_cache_hit_bytes_total)
served_c2=$(delta c shadowcache_peer_served_bytes_total)
[ "$peer2" -gt 0 ] || fail "boot 2: b fetched nothing from its peers (shadowcache_peer_read_bytes_total did not grow)"
[ "$served_c2" -gt 0 ] || fail "boot 2: c served no bytes to b (shadowcache_peer_served_bytes_total did not grow)"
[ "$owner2" -lt "$peer2" ] || fail "boot 2: b read more from the owner ($owner2 B) than from peers ($peer2 B)"

boot b 3
peer3=$(delta b shadowcache_peer_read_bytes_total)
owner3=$(delta b shadowcache_owner_read_bytes_total)
hit3=$(delta b shadowcache_cache_hit_bytes_total)
[ "$hit3" -gt 0 ] || fail "boot 3: b served nothing from its cache"
[ $((peer3 + owner3)) = 0 ] || fail "boot 3: b still fetched $peer3 B from peers and $owner3 B from the owner"
[ "$hit3" -ge "$data_bytes" ] || fail "boot 3: b served $hit3 B from its cache, less than the $data_bytes B of data the guest read"

echo "== summary"
egress=$(metric a shadowcache_peer_served_bytes_total)
echo "owner a sent $egress B of blocks to members in all, for 3 boots of $read1 B of block reads each (image: $used B used)"
echo "b read $(metric b shadowcache_owner_read_bytes_total) B from a in all (as the home of blocks c missed in boot 1)," \
  "$(metric b shadowcache_peer_read_bytes_total) B from c; c read $(metric c shadowcache_owner_read_bytes_total) B from a," \
  "$(metric c shadowcache_peer_read_bytes_total) B from b"
# Each block leaves the owner about once: three boots cost it less than one boot reads.
[ "$egress" -lt "$read1" ] || fail "owner a sent $egress B for three boots, not less than the $read1 B one boot reads"
ok=1
echo "deploy/vm-test.sh: all passed: 3 boots through non-owners (c ${boot_seconds[0]} s, b ${boot_seconds[1]} s, b ${boot_seconds[2]} s), $nfiles/$nfiles files OK each; b boot 2: $peer2 B from peers, $owner2 B from owner, $hit2 B from cache; b boot 3: $hit3 B from cache, 0 B fetched; owner egress $egress B"
