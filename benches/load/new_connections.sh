#!/usr/bin/env bash
# graphgate's CPU per request when every request comes on a new connection: bursts of N
# connections opened at once, each sending one read of the same cached node
# (examples/burst.rs), so what is measured is accepting, serving and closing a connection
# around a cache hit. Prints, per build, the mean p50 of the bursts and graphgate's CPU time
# (user + system, from /proc) divided by the requests. With several builds given, they run
# one after another, ROUNDS times, alternating.
#
# Starts on 127.0.0.1: `graphgate fake-graph` and graphgate in front of it (in-memory cache,
# default workers, log level warn).
#
# Needs: curl.
# Usage: benches/load/new_connections.sh [path/to/graphgate ...]
#        (default: the release build; env: N, BURSTS, ROUNDS, PORT_BASE)
#   benches/load/new_connections.sh target/release/graphgate /tmp/old/target/release/graphgate
set -euo pipefail

N=${N:-200}
BURSTS=${BURSTS:-100}
ROUNDS=${ROUNDS:-2}
PORT_BASE=${PORT_BASE:-19620}
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/rig.sh
. benches/load/rig.sh

command -v curl >/dev/null || { echo "new_connections.sh: missing curl" >&2; exit 1; }
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --example burst
[ $# -gt 0 ] || { cargo build --release --quiet --bin graphgate; set -- "$TARGET/release/graphgate"; }
BURST="$TARGET/release/examples/burst"

rig_start new-connections

P_GRAPH=$PORT_BASE
P_GG=$((PORT_BASE + 1))
KEY=new-connections-key
write_graphgate_conf "$WORK/gg.toml" "$P_GG" "$P_GRAPH" "$KEY"

"$1" fake-graph --listen "127.0.0.1:$P_GRAPH" --latency-ms 1 >"$WORK/graph.log" 2>&1 &
PIDS+=($!)
wait_for "http://127.0.0.1:$P_GRAPH/"

URL="http://127.0.0.1:$P_GG/v21.0/1001?fields=id,name&access_token=$KEY"
echo "$BURSTS bursts of $N new connections, one cached read each"
for r in $(seq 1 "$ROUNDS"); do
    for gg in "$@"; do
        "$gg" serve --config "$WORK/gg.toml" >"$WORK/gg.log" 2>&1 &
        pid=$!
        wait_for "http://127.0.0.1:$((P_GG + 1))/healthz"
        "$BURST" "$URL" "$N" >/dev/null # fills the cache
        before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        p50=$(for _ in $(seq 1 "$BURSTS"); do "$BURST" "$URL" "$N"; done |
            awk '{for (i = 1; i <= NF; i++) if ($i ~ /^p50_ms=/) {split($i, a, "="); s += a[2]; n++}}
                 END {printf "%.2f", s / n}')
        after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        ticks=$((after - before))
        hz=$(getconf CLK_TCK)
        echo "  round $r $gg: mean p50 $p50 ms; CPU per request $(awk -v t="$ticks" -v hz="$hz" -v n=$((N * BURSTS)) 'BEGIN {printf "%.1f", t / hz * 1e6 / n}') us"
    done
done
