# shellcheck shell=bash
# Shared by deploy/'s test scripts (sourced, not run). The caller sets SCRIPT to its own name
# first, for the messages.

# Fails the script loudly.
fail() {
  echo "$SCRIPT: FAILED: $*" >&2
  exit 1
}

# need CMD:PACKAGE ...: installs the packages of the commands that are missing (apt, as root),
# or fails naming them; then fails unless every command is there.
need() {
  local missing=() pair round
  # Twice: an install may remove a tool another package gave (Debian's qemu-system-x86 7.2
  # removes a newer qemu-utils installed from backports, and qemu-img with it), and the
  # second round installs that again, from the same archive as what removed it.
  for round in 1 2; do
    missing=()
    for pair in "$@"; do
      command -v "${pair%%:*}" >/dev/null 2>&1 && continue
      [[ " ${missing[*]} " == *" ${pair##*:} "* ]] || missing+=("${pair##*:}")
    done
    [ ${#missing[@]} -gt 0 ] || break
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
        fail "apt-get install ${missing[*]} failed"
      fi
    else
      fail "missing tools; please install: ${missing[*]}"
    fi
  done
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || fail "${pair%%:*} is not installed and could not be installed"
  done
}

# A TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# metric_sum PORT NAME: the sum of every series of NAME at http://127.0.0.1:PORT/metrics (0 when
# there is none yet).
metric_sum() {
  curl -sf --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v m="$2" '
    $1 == m || index($1, m "{") == 1 {s += $NF} END {printf "%.0f\n", s}'
}
