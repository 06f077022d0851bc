#!/usr/bin/env bash
# Instructions per cache hit through a served graphgate, counted by callgrind: the whole
# request as a client sends it over a socket (hyper, the tower stack, the cache, the reply),
# with the binary's own allocator. Counts do not depend on machine load, so two builds can be
# compared on a busy 2-core machine where req/s and CPU time move by 10-30 % between runs.
#
# Starts on 127.0.0.1: the simulated Graph API (`graphgate fake-graph`) and graphgate under
# callgrind in front of it (in-memory cache, log level warn). Warms the cache and the
# connections with WARM hits, zeroes the counters, sends HITS hits (h2load --h1, 16
# connections), dumps the counters and prints instructions per hit. The dump is kept in
# $OUT (default: a temporary directory) for `callgrind_annotate`.
#
# With MISSES=1, counts a cache miss instead: every request a new key (h2load -i with unique
# URLs, one connection), the simulated Graph answering each; WARM misses first. SET="a.b=c"
# passes `--set a.b=c` to graphgate (e.g. SET=cache.project_fields=false). FIELDS is the
# read's `fields=` list (default id,name,about,category,fan_count).
#
# Needs: valgrind (callgrind_control), h2load (Debian: nghttp2-client), curl.
# Usage: benches/load/hit_instructions.sh [path/to/graphgate ...]   (default: the release
#        build, built if missing; env: HITS, WARM, MISSES, SET, FIELDS, PORT_BASE, OUT)
#   benches/load/hit_instructions.sh target/release/graphgate /tmp/old/target/release/graphgate
set -euo pipefail

MISSES=${MISSES:-0}
if [ "$MISSES" = 1 ]; then
    HITS=${HITS:-4000}
    WARM=${WARM:-1000}
else
    HITS=${HITS:-10000}
    WARM=${WARM:-2000}
fi
SET=${SET:-}
FIELDS=${FIELDS:-id,name,about,category,fan_count}
PORT_BASE=${PORT_BASE:-19300}
cd "$(dirname "$0")/../.."

for c in valgrind callgrind_control h2load curl; do
    command -v "$c" >/dev/null || { echo "hit_instructions.sh: missing $c (Debian: valgrind, nghttp2-client, curl)" >&2; exit 1; }
done
if [ $# -eq 0 ]; then
    [ -x target/release/graphgate ] || cargo build --release --bin graphgate
    set -- target/release/graphgate
fi

WORK=$(mktemp -d)
OUT=${OUT:-$WORK}
mkdir -p "$OUT"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ "$OUT" = "$WORK" ] || rm -rf "$WORK"
}
trap cleanup EXIT

P_GRAPH=$PORT_BASE
P_GG=$((PORT_BASE + 1))
KEY=hits-client-key
cat >"$WORK/gg.toml" <<EOF
[server]
listen = "127.0.0.1:$P_GG"
admin_listen = "127.0.0.1:$((P_GG + 1))"
[upstream]
url = "http://127.0.0.1:$P_GRAPH"
[credentials]
system_user_token = "demo-system-user-token"
app_secret = "demo-app-secret"
# Budgets far above the run's calls: misses must reach Graph, not wait for quota.
[quota]
page_calls = 1000000000
app_calls = 1000000000
[log]
level = "warn"
[[clients]]
name = "hits"
key = "$KEY"
pages = ["*"]
EOF

wait_for() { # url
    for _ in $(seq 1 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.2; done
    echo "hit_instructions.sh: nothing answers at $1; logs:" >&2
    tail -n 5 "$WORK"/*.log >&2 || true
    exit 1
}

"$1" fake-graph --listen "127.0.0.1:$P_GRAPH" --page-calls 1000000000 >"$WORK/graph.log" 2>&1 &
PIDS+=($!)
wait_for "http://127.0.0.1:$P_GRAPH/"
URL="http://127.0.0.1:$P_GG/v21.0/1001?fields=$FIELDS&access_token=$KEY"

SET_ARGS=()
[ -z "$SET" ] || SET_ARGS=(--set "$SET")
what=hit whats=hits
[ "$MISSES" = 1 ] && what=miss whats=misses
n=0
for bin in "$@"; do
    n=$((n + 1))
    file="$OUT/callgrind.$n"
    valgrind --tool=callgrind --callgrind-out-file="$file" "$bin" serve --config "$WORK/gg.toml" \
        "${SET_ARGS[@]}" >"$WORK/gg.log" 2>&1 &
    vg=$!
    PIDS+=("$vg")
    wait_for "$URL"
    if [ "$MISSES" = 1 ]; then
        # Keys no run has asked for: this binary's number and the time.
        for i in $(seq 1 "$WARM"); do echo "$URL&k=w$n-$i-$(date +%s)"; done >"$WORK/warm.txt"
        for i in $(seq 1 "$HITS"); do echo "$URL&k=m$n-$i-$(date +%s)"; done >"$WORK/measured.txt"
        load=(-c 1 -i)
        warm_arg=("$WORK/warm.txt")
        measured_arg=("$WORK/measured.txt")
    else
        load=(-c 16)
        warm_arg=("$URL")
        measured_arg=("$URL")
    fi
    h2load --h1 -n "$WARM" "${load[@]}" "${warm_arg[@]}" | grep -q "$WARM succeeded" || { echo "warm-up failed" >&2; exit 1; }
    if [ "$MISSES" != 1 ]; then
        curl -s -D - -o /dev/null "$URL" | grep -qi '^x-cache: HIT' || { echo "$bin: not a cache hit" >&2; exit 1; }
    fi
    callgrind_control -z "$vg" >/dev/null 2>&1
    h2load --h1 -n "$HITS" "${load[@]}" "${measured_arg[@]}" >"$WORK/h2load.out"
    grep -q "$HITS succeeded" "$WORK/h2load.out" || { cat "$WORK/h2load.out" >&2; exit 1; }
    callgrind_control -d "$vg" >/dev/null 2>&1
    sleep 1
    kill -INT "$vg"
    wait "$vg" || true
    ir=$(callgrind_annotate "$file.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "$bin${SET:+ (--set $SET)}: $((ir / HITS)) instructions per $what ($HITS $whats; callgrind dump $file.1)"
done
