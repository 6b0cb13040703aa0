#!/usr/bin/env bash
# Packs what a lent many-core machine needs for the NBD cold-member bench (issue 15) into
# devkit/ (ignored by git): the release bench, fio and qemu-nbd with the shared libraries
# they load, and devkit/run.sh, which runs the bench there and writes JSON under $OUT.
#
#   scripts/device-kit.sh            # builds the release binaries first
#   SKIP_BUILD=1 scripts/device-kit.sh
#
# Then, through the device tool: command `bash devkit/run.sh 2>&1 | tee $OUT/log.txt`,
# carry ["devkit"], timeout_s about 480. Never part of CI or the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
if [[ -z ${SKIP_BUILD:-} ]]; then
    RUSTFLAGS="${RUSTFLAGS:---cfg tokio_unstable}" cargo build --release -p shadowcache-bench -p shadowcache-node
fi
for tool in fio qemu-nbd; do
    command -v "$tool" >/dev/null || { echo "device-kit: $tool is missing (apt-get install fio qemu-utils)" >&2; exit 1; }
done
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib" devkit
cp "$target/release/shadowcache-bench" "$target/release/shadowcache-node" "$stage/bin/"
strip "$stage/bin/"shadowcache-*
for tool in fio qemu-nbd; do
    bin=$(command -v "$tool")
    cp "$bin" "$stage/bin/"
    # Every library it loads but the loader and libc (the machine has its own).
    ldd "$bin" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
        case $(basename "$lib") in
            libc.so.*|ld-linux*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*) ;;
            *) cp -L "$lib" "$stage/lib/" ;;
        esac
    done
done
tar -C "$stage" -cJf devkit/kit.tar.xz .
cat > devkit/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs on the lent machine: three runs of the cold-member NBD bench, each with the
# read-ahead settings in another order (the first member of a run is the slowest).
set -u
kit=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-/tmp/out}
mkdir -p /tmp/kit "$out"
tar -xJf "$kit/kit.tar.xz" -C /tmp/kit
export PATH=/tmp/kit/bin:$PATH LD_LIBRARY_PATH=/tmp/kit/lib
echo "cores: $(nproc)"; fio --version; qemu-nbd --version | head -1
orders=(0,16MiB,64MiB 16MiB,64MiB,0 64MiB,0,16MiB)
for i in 1 2 3; do
    timeout 150 shadowcache-bench nbd --cold-member-only --image 1GiB \
        --member-read-ahead "${orders[i-1]}" --json "$out/nbd-ra$i.json" > "$out/nbd-ra$i.txt" 2>&1
    echo "run $i (${orders[i-1]}): exit $?"; tail -12 "$out/nbd-ra$i.txt"
done
RUN
chmod +x devkit/run.sh
echo "devkit/kit.tar.xz ($(du -h devkit/kit.tar.xz | cut -f1)) and devkit/run.sh written"
