#!/usr/bin/env bash
# CPU per cache miss with many misses in flight, side by side: graphgate and nginx as a plain
# reverse proxy (proxy_pass with a keep-alive upstream pool, no cache), each in front of the
# simulated Graph API (LATENCY_MS per reply). wrk sends reads for keys never asked before
# (every one a miss) on CONNS connections for DURATION seconds per round, ROUNDS rounds
# alternating the two. Prints, per round, the replies and the proxy's CPU per reply split
# into user and kernel time (utime and stime of its processes from /proc, before and after).
#
# With 200 connections and 50 ms at Graph this is the steady state of the quota_load bench's
# 200-call burst: what a proxy's per-miss work costs when every request's state has gone
# cold while it waited for Graph. graphgate runs with a Page budget far above what the run
# sends (`[quota] page_calls`), so every request is a miss forwarded at once.
#
# Needs: nginx (Debian: nginx-light), wrk, openssl, curl.
# Usage: benches/load/miss_cpu.sh   (env: CONNS, DURATION, ROUNDS, LATENCY_MS, PORT_BASE)
set -euo pipefail

CONNS=${CONNS:-200}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-2}
LATENCY_MS=${LATENCY_MS:-50}
PORT_BASE=${PORT_BASE:-19600}
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/rig.sh
. benches/load/rig.sh

for c in nginx wrk openssl curl; do
    command -v "$c" >/dev/null || { echo "miss_cpu.sh: missing $c (Debian: nginx-light, wrk, openssl, curl)" >&2; exit 1; }
done
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --bin graphgate
GG="$TARGET/release/graphgate"

rig_start miss-cpu

P_GRAPH=$PORT_BASE
P_GG=$((PORT_BASE + 1)) # admin +2
P_NGINX=$((PORT_BASE + 3))
KEY=miss-cpu-client-key
TOKEN=demo-system-user-token # what `graphgate fake-graph` accepts
PROOF=$(printf '%s' "$TOKEN" | openssl dgst -sha256 -hmac demo-app-secret | awk '{print $NF}')

write_graphgate_conf "$WORK/gg.toml" "$P_GG" "$P_GRAPH" "$KEY" "$(printf '[quota]\npage_calls = 1000000000')"
write_nginx_proxy_conf "$WORK" "$P_NGINX" "$P_GRAPH"

"$GG" fake-graph --listen "127.0.0.1:$P_GRAPH" --latency-ms "$LATENCY_MS" \
    --page-calls 1000000000 --page-window-s 3600 >"$WORK/graph.log" 2>&1 &
PIDS+=($!)
"$GG" serve --config "$WORK/gg.toml" >"$WORK/gg.log" 2>&1 &
GG_PID=$!
PIDS+=("$GG_PID")
nginx -c "$WORK/nginx.conf" >"$WORK/nginx.out" 2>&1 &
PIDS+=($!)
wait_for "http://127.0.0.1:$P_GRAPH/"
wait_for "http://127.0.0.1:$((P_GG + 1))/healthz"
wait_for "http://127.0.0.1:$P_NGINX/"

# The processes whose CPU counts: graphgate's one, nginx's master and workers.
pids_of() { # target
    case $1 in
        graphgate) echo "$GG_PID" ;;
        nginx) local m; m=$(cat "$WORK/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')" ;;
    esac
}
ticks() { # pids... -> "user system" clock ticks
    for p in "$@"; do awk '{print $14, $15}' "/proc/$p/stat"; done | awk '{u += $1; s += $2} END {print u + 0, s + 0}'
}
HZ=$(getconf CLK_TCK)

# Unique keys: the target, the round and a counter in a parameter Graph ignores.
lua() { # target round auth
    cat <<EOF
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/v21.0/1001_" .. (n % 60 + 1) .. "?fields=id&n=$1$2_" .. n .. "&$3")
end
EOF
}

echo "unique-key reads, $CONNS connections, ${DURATION} s per round, simulated Graph at ${LATENCY_MS} ms"
for r in $(seq 1 "$ROUNDS"); do
    for t in graphgate nginx; do
        case $t in
            graphgate) port=$P_GG auth="access_token=$KEY" ;;
            nginx) port=$P_NGINX auth="access_token=$TOKEN&appsecret_proof=$PROOF" ;;
        esac
        lua "$t" "$r" "$auth" >"$WORK/miss.lua"
        read -r -a pids <<<"$(pids_of "$t")"
        read -r u0 s0 <<<"$(ticks "${pids[@]}")"
        out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$WORK/miss.lua" "http://127.0.0.1:$port")
        read -r u1 s1 <<<"$(ticks "${pids[@]}")"
        n=$(echo "$out" | awk '/requests in/ {print $1}')
        bad=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
        awk -v t="$t" -v r="$r" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" -v bad="${bad:-0}" 'BEGIN {
            printf "  round %d %-9s %7d replies (non-2xx %d): user %5.1f us, kernel %5.1f us per miss\n",
                r, t, n, bad, u * 1e6 / hz / n, s * 1e6 / hz / n
        }'
    done
done
