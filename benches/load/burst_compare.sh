#!/usr/bin/env bash
# N distinct reads at once (default 200), each a cache miss, side by side: straight to the
# simulated Graph API, through nginx as a plain reverse proxy (proxy_pass with a keep-alive
# upstream pool, no cache), and through graphgate with its default [quota] and cache. What a
# proxy hop itself adds to a burst of misses on this machine, next to what graphgate adds.
#
# Starts on 127.0.0.1: `graphgate fake-graph` (LATENCY_MS per reply, Page limit 4800 per
# hour), nginx (two workers) and graphgate in front of it. Each round sends one burst per
# target with examples/burst.rs (connections opened first, every request written at once,
# `{i}` in the URL makes N different keys); the first round also fills the proxies'
# upstream pools. Prints each burst's percentiles and, per target, the median p50 of the
# rounds after the first (of an even count, the lower of the middle two).
#
# The three targets share the simulated Graph's Page 1001, as other apps would: after a few
# rounds the Page is half used and graphgate's quota steward starts pacing (429 with
# Retry-After), as it is meant to. Keep ROUNDS small (default 4).
#
# PIN=1 gives the proxies a core of their own: nginx and graphgate run on CPU 1, the
# simulated Graph and the burst client on CPU 0 (taskset). Unpinned, all of them share both
# cores, and a proxy's added latency is mostly its CPU time taken from the others.
#
# Needs: nginx (Debian: nginx-light), openssl, curl; taskset (util-linux) for PIN=1.
# Usage: benches/load/burst_compare.sh   (env: N, ROUNDS, LATENCY_MS, PORT_BASE, PIN)
set -euo pipefail

N=${N:-200}
ROUNDS=${ROUNDS:-4}
LATENCY_MS=${LATENCY_MS:-50}
PORT_BASE=${PORT_BASE:-19500}
PIN=${PIN:-0}
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/rig.sh
. benches/load/rig.sh

for c in nginx openssl curl; do
    command -v "$c" >/dev/null || { echo "burst_compare.sh: missing $c (Debian: nginx-light, openssl, curl)" >&2; exit 1; }
done
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --bin graphgate --example burst
GG="$TARGET/release/graphgate"
BURST="$TARGET/release/examples/burst"
ON_PROXY_CPU=() ON_OTHER_CPU=()
if [ "$PIN" = 1 ]; then
    ON_PROXY_CPU=(taskset -c 1) ON_OTHER_CPU=(taskset -c 0)
fi

rig_start burst

P_GRAPH=$PORT_BASE
P_GG=$((PORT_BASE + 1))      # admin +2
P_NGINX=$((PORT_BASE + 3))
KEY=burst-client-key
TOKEN=demo-system-user-token   # what `graphgate fake-graph` accepts
PROOF=$(printf '%s' "$TOKEN" | openssl dgst -sha256 -hmac demo-app-secret | awk '{print $NF}')

write_graphgate_conf "$WORK/gg.toml" "$P_GG" "$P_GRAPH" "$KEY"
write_nginx_proxy_conf "$WORK" "$P_NGINX" "$P_GRAPH"

"${ON_OTHER_CPU[@]}" "$GG" fake-graph --listen "127.0.0.1:$P_GRAPH" --latency-ms "$LATENCY_MS" \
    --page-calls 4800 --page-window-s 3600 >"$WORK/graph.log" 2>&1 &
PIDS+=($!)
"${ON_PROXY_CPU[@]}" "$GG" serve --config "$WORK/gg.toml" >"$WORK/gg.log" 2>&1 &
PIDS+=($!)
"${ON_PROXY_CPU[@]}" nginx -c "$WORK/nginx.conf" >"$WORK/nginx.out" 2>&1 &
PIDS+=($!)
wait_for "http://127.0.0.1:$P_GRAPH/"
wait_for "http://127.0.0.1:$((P_GG + 1))/healthz"
wait_for "http://127.0.0.1:$P_NGINX/"

url() { # target round
    local q="fields=id&n={i}&r=$1$2"
    case $1 in
        direct) echo "http://127.0.0.1:$P_GRAPH/v21.0/1001_{j}?$q&access_token=$TOKEN&appsecret_proof=$PROOF" ;;
        nginx) echo "http://127.0.0.1:$P_NGINX/v21.0/1001_{j}?$q&access_token=$TOKEN&appsecret_proof=$PROOF" ;;
        graphgate) echo "http://127.0.0.1:$P_GG/v21.0/1001_{j}?$q&access_token=$KEY" ;;
    esac
}

declare -A P50S
echo "$N distinct reads at once, simulated Graph at ${LATENCY_MS} ms; round 1 also opens the upstream pools"
for r in $(seq 1 "$ROUNDS"); do
    for t in direct nginx graphgate; do
        line=$("${ON_OTHER_CPU[@]}" "$BURST" "$(url "$t" "$r")" "$N")
        echo "  round $r $t: $line"
        if [ "$r" -gt 1 ]; then
            p50=${line#*p50_ms=}
            P50S[$t]="${P50S[$t]:-} ${p50%% *}"
        fi
    done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "-"}'; }
if [ "$ROUNDS" -gt 1 ]; then
    d=$(echo "${P50S[direct]}" | median)
    for t in direct nginx graphgate; do
        m=$(echo "${P50S[$t]}" | median)
        echo "median p50 (rounds 2-$ROUNDS) $t: $m ms, added over direct: $(awk -v a="$m" -v b="$d" 'BEGIN {printf "%.1f", a - b}') ms"
    done
fi
