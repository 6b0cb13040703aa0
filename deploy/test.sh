#!/usr/bin/env bash
# Tests of what deploy/ ships, against the real tools (issue 19). Installs what it needs from
# apt when run as root (scripts/test.sh calls it, and CI calls that).
#
# - Prometheus: `promtool check config` and `check rules`, and the rules' unit tests
#   (`promtool test rules`).
# - A running node (the debug binaries, built if missing) with a certificate, serving reads over
#   NBD and gRPC: every metric the Grafana dashboard and the alert rules query is one it
#   exports.
# - A real Prometheus on loopback scrapes that node; a query through its HTTP API returns the
#   node's cache hit counter, above zero.
# - Kubernetes: the base and the production overlay (with a CA, cluster key and member
#   certificate made by `shadowcache certs`) render with `kubectl kustomize` and validate with
#   `kubernetes-validate --strict` (PyPI, in a virtualenv) for every Kubernetes version from
#   1.29 to the newest it knows.
# - systemd: the unit passes `systemd-analyze verify` with no warning at all (an unknown key is
#   only a warning there), and `systemd-analyze security --offline=true` rates its exposure at
#   most 2.0 (it is 1.6; 10 is an unprotected service).
# - deploy/container-test.sh: the image builds, the compose cluster serves a replica through
#   NBD to the host, `compose down -v` leaves nothing; the unit runs under systemd as PID 1.
# - deploy/vm-test.sh: a VM boots with its root disk served through the cluster.
#
# Bounded: every wait has a deadline; the node and Prometheus are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=deploy/test.sh
# shellcheck source=deploy/lib.sh
. deploy/lib.sh

need promtool:prometheus prometheus:prometheus nbdcopy:libnbd-bin curl:curl \
  systemd-analyze:systemd

echo "== promtool: config, rules, rule unit tests"
(cd deploy/prometheus && promtool check config prometheus.yml && promtool check rules shadowcache.rules.yml \
  && promtool test rules shadowcache.rules.test.yml)

bin=target/debug
if [ ! -x "$bin/shadowcache-node" ] || [ ! -x "$bin/shadowcache" ]; then
  cargo build -q -p shadowcache-node -p shadowcache-client
fi

work=$(mktemp -d)

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "== systemd: verify, security"
# The unit names /usr/bin/shadowcache-node; verify checks that ExecStart exists, so a copy
# names the binary just built.
sed "s#/usr/bin/shadowcache-node#$(pwd)/$bin/shadowcache-node#g" deploy/systemd/shadowcache-node.service \
  > "$work/shadowcache-node.service"
verify=$(systemd-analyze verify --man=no "$work/shadowcache-node.service" 2>&1) || {
  echo "deploy/test.sh: FAILED: systemd-analyze verify: $verify" >&2; exit 1; }
if [ -n "$verify" ]; then
  echo "deploy/test.sh: FAILED: systemd-analyze verify warns: $verify" >&2
  exit 1
fi
systemd-analyze security --offline=true --threshold=20 "$work/shadowcache-node.service" | tail -1

echo "== Kubernetes: kustomize, kubernetes-validate --strict"
if command -v kubectl >/dev/null 2>&1; then
  venv="${KUBE_VALIDATE_VENV:-target/kubernetes-validate-venv}"
  if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q kubernetes-validate
  fi
  cp -r deploy/kubernetes "$work/kubernetes"
  certs="$work/kubernetes/overlays/production/certs"
  "$bin/shadowcache" certs init "$certs" >/dev/null
  "$bin/shadowcache" certs issue --ca "$certs" --any-node member >/dev/null
  kubectl kustomize "$work/kubernetes/base" > "$work/k8s-base.yaml"
  kubectl kustomize "$work/kubernetes/overlays/production" > "$work/k8s-production.yaml"
  grep -q "kind: DaemonSet" "$work/k8s-production.yaml"
  grep -q "kind: PodDisruptionBudget" "$work/k8s-production.yaml"
  grep -q "name: shadowcache-tls" "$work/k8s-production.yaml"
  schemas=$(ls "$venv"/lib/python3*/site-packages/kubernetes_validate/kubernetes-json-schema/ \
    | sed -n 's/^v\(1\.[0-9]*\)\.0-local-strict$/\1/p' | sort -V)
  checked=0
  for v in $schemas; do
    [ "${v#1.}" -ge 29 ] || continue
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$v.0" "$work/k8s-base.yaml" "$work/k8s-production.yaml"
    checked=$((checked + 1))
  done
  [ "$checked" -ge 1 ] || { echo "deploy/test.sh: FAILED: no Kubernetes schema >= 1.29 found" >&2; exit 1; }
  echo "Kubernetes manifests valid for $checked versions: $(echo $schemas | tr ' ' '\n' | awk -F. '$2>=29' | tr '\n' ' ')"
else
  echo "WARNING: deploy/test.sh: kubectl is not installed: the Kubernetes manifests were NOT validated" >&2
fi

metrics_port=$(free_port)
prom_port=$(free_port)
peer_port=$(free_port)

echo "== a node with a certificate, read over NBD and gRPC"
"$bin/shadowcache" certs init "$work/pki" >/dev/null
"$bin/shadowcache" certs issue --ca "$work/pki" node-1 >/dev/null
head -c $((4 << 20)) /dev/urandom > "$work/base.raw"
cat > "$work/node.toml" <<EOF
node_id = "node-1"
data_dir = "$work/data"
metrics = "127.0.0.1:$metrics_port"
[cluster]
peer_listen = "127.0.0.1:$peer_port"
secret_file = "$work/pki/cluster.key"
[cache]
ram = "64MiB"
ssd = "16MiB"
[nbd_tls]
cert = "$work/pki/node-1.pem"
key = "$work/pki/node-1.key"
[[disk]]
id = "base"
origin = "$work/base.raw"
mode = "sealed"
EOF
"$bin/shadowcache-node" --check-config --config "$work/node.toml" >/dev/null
"$bin/shadowcache-node" --config "$work/node.toml" > "$work/node.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  [ -S "$work/data/nbd.sock" ] && [ -S "$work/data/shadowcache.sock" ] && break
  sleep 0.1
done
export SHADOWCACHE_SOCKET="$work/data/shadowcache.sock"
for _ in 1 2; do
  nbdcopy "nbd+unix:///base?socket=$work/data/nbd.sock" "$work/copy.raw"
  cmp "$work/base.raw" "$work/copy.raw"
  "$bin/shadowcache" read base --offset 0 --length 1048576 -o "$work/part.raw"
done
curl -sf "http://127.0.0.1:$metrics_port/metrics" > "$work/metrics.txt"

echo "== every metric the dashboard and the rules query is exported"
python3 - "$work/metrics.txt" deploy/grafana/shadowcache.json deploy/prometheus/shadowcache.rules.yml <<'EOF'
import json, re, sys
exported = set()
for line in open(sys.argv[1]):
    if line.startswith("#") or not line.strip():
        continue
    exported.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
dash = json.load(open(sys.argv[2]))
queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
queries += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
# The rules' expressions: every line but comments, summaries and descriptions.
queries += [l for l in open(sys.argv[3])
            if not l.lstrip().startswith(("#", "summary:", "description:"))]
wanted = set()
for q in queries:
    wanted.update(re.findall(r"\bshadowcache_[a-z0-9_]+", q))
missing = sorted(w for w in wanted if w not in exported)
print(f"{len(wanted)} metrics queried, {len(exported)} exported")
if missing:
    print("queried but not exported by the node: " + ", ".join(missing), file=sys.stderr)
    sys.exit(1)
if not any(p["title"].startswith("NBD latency") for p in dash["panels"]):
    sys.exit("the dashboard lost its NBD latency panel")
EOF

echo "== a real Prometheus scrapes the node"
cat > "$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
rule_files:
  - $(pwd)/deploy/prometheus/shadowcache.rules.yml
scrape_configs:
  - job_name: shadowcache
    static_configs:
      - targets: ["127.0.0.1:$metrics_port"]
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 &
pids+=($!)
query="sum(shadowcache_cache_hits_total)"
value=""
for _ in $(seq 1 60); do
  value=$(curl -sf --get "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$query" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' \
    2>/dev/null || true)
  if [ -n "$value" ] && python3 -c "import sys; sys.exit(0 if float('$value') > 0 else 1)"; then
    break
  fi
  value=""
  sleep 0.5
done
if [ -z "$value" ]; then
  echo "deploy/test.sh: FAILED: Prometheus never returned $query above 0" >&2
  tail -20 "$work/prometheus.log" >&2
  exit 1
fi
echo "Prometheus: $query = $value"

echo "== the image, the compose cluster, the unit under systemd (deploy/container-test.sh)"
deploy/container-test.sh
echo "== a VM boots through the cluster (deploy/vm-test.sh)"
deploy/vm-test.sh
echo "deploy/test.sh: all passed"
