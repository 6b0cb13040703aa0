#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time on its committed corpus
# (fuzz/corpus/TARGET, copied first: new inputs stay out of the checkout), with libFuzzer
# through cargo-fuzz on the stable toolchain (no sanitizer; debug assertions on; 16 codegen
# units: the instrumented build of every dependency took 8.5 min here instead of about 18).
#
#   scripts/fuzz.sh               # every target, FUZZ_SECONDS (default 20) each: what CI runs
#   FUZZ_SECONDS=3600 scripts/fuzz.sh nbd_server   # one target for an hour
#
# A crash leaves its input under fuzz/artifacts/TARGET/ and fails the script; replay it with
# `cargo +stable fuzz run -s none -O -a --codegen-units 16 TARGET fuzz/artifacts/TARGET/crash-...`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo +stable fuzz build -s none -O --debug-assertions --codegen-units 16 2>&1 | tail -n 3
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  echo "== fuzz $t for ${seconds}s"
  cargo +stable fuzz run -s none -O --debug-assertions --codegen-units 16 "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 2>&1 |
    grep -E "^(INFO: seed corpus|#[0-9]+ *DONE|stat::number_of_executed_units|stat::new_units_added|==[0-9]+== ERROR|SUMMARY|thread .* panicked|Done [0-9]+ runs)" || true
  # cargo fuzz exits non-zero on a crash; grep above hides the status, so check artifacts.
  if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
    echo "scripts/fuzz.sh: $t found a crash: $(ls fuzz/artifacts/"$t")" >&2
    exit 1
  fi
done
