#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the real-binary integration tests and doc tests.
# Installs what the tests need first, so that it passes on a fresh machine (CI calls it too).
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools from apt that the NBD tests drive (node/tests/nbd.rs): each command and its package.
need_apt=()
# The fault campaign (bench/tests/campaign.rs) drives ip (namespaces), kill and mount as root,
# and iptables where bridged frames pass through it (br_netfilter on, as Docker leaves it:
# bench/src/netfilter.rs), else the partition scenarios and the boot storm cannot start.
for pair in qemu-img:qemu-utils qemu-io:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin \
            fio:fio nbdkit:nbdkit ip:iproute2 kill:procps iptables:iptables; do
  cmd=${pair%%:*} pkg=${pair##*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! " ${need_apt[*]} " =~ " $pkg " ]]; then
    need_apt+=("$pkg")
  fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "scripts/test.sh: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi

# The shared traces sit beside the checkout (../shared); tests that replay them say so loudly
# when they are missing.
[ -d ../shared/traces ] || echo "WARNING: ../shared/traces is missing; trace tests will fail" >&2

# The simulation replays a seed exactly only when it can seed tokio's own random choices
# (which of a watch channel's waiters wakes first, select! branches): `--cfg tokio_unstable`
# gives it `Builder::rng_seed`. These test builds only; release and fuzz builds do not set it.
test_rustflags="${RUSTFLAGS:-} --cfg tokio_unstable"

# The fault tests (node/tests/faults.rs) need the node built with fail points.
features=(--features shadowcache-node/failpoints)
if cargo nextest --version >/dev/null 2>&1; then
  RUSTFLAGS="$test_rustflags" cargo nextest run --workspace "${features[@]}" --no-fail-fast --failure-output final
  RUSTFLAGS="$test_rustflags" cargo test --workspace "${features[@]}" --doc
else
  echo "cargo-nextest not found; using cargo test" >&2
  RUSTFLAGS="$test_rustflags" cargo test --workspace "${features[@]}" --no-fail-fast
fi

# What deploy/ ships, against the real tools: promtool, a real Prometheus scraping a node, and
# the dashboard's and rules' metrics against what the node exports (deploy/test.sh).
# Same RUSTFLAGS as the test build, so that its `cargo build` reuses those dependencies instead
# of building a second set (disk on a CI machine is not unlimited).
RUSTFLAGS="$test_rustflags" ./deploy/test.sh

# Every fuzz target for a bounded time on its committed corpus (scripts/fuzz.sh; FUZZ_SECONDS,
# default 20 s a target; FUZZ_SECONDS=0 skips them and says so).
if [ "${FUZZ_SECONDS:-20}" = 0 ]; then
  echo "WARNING: FUZZ_SECONDS=0: fuzz targets not run" >&2
else
  ./scripts/fuzz.sh
fi
