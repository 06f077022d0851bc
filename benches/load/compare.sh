#!/usr/bin/env bash
# graphgate vs nginx proxy_cache vs Varnish, side by side on loopback.
#
# Starts, on 127.0.0.1 only:
#   - a static upstream (nginx `return 200`) serving a ~1 KB Graph-like JSON node with a
#     low X-Business-Use-Case-Usage reading, as Graph sends;
#   - nginx with proxy_cache + proxy_cache_lock, Varnish (malloc storage), and graphgate
#     (release build, in-memory cache) in front of it;
#   - the floor: nginx answering the same body with the same Content-Type straight from
#     memory (`return 200 '...'`, no proxy, no cache), the least a server can do per reply
#     (checked byte for byte against the upstream's reply before measuring);
#   - the hyper floor: examples/hyper_floor, graphgate's server layout (a one-thread
#     runtime per worker, SO_REUSEPORT, hyper-util's auto builder, mimalloc) answering the
#     same body from memory: what hyper and tokio cost per reply, so a hit's CPU splits into
#     theirs and what graphgate adds;
#   - with GG_BASELINE=/path/to/graphgate (a build of an older commit): a second graphgate,
#     the same config, on its own port in front of the same upstream, measured as the
#     target "graphgate-baseline" in the same hit rounds and miss-overhead run, so before
#     and after figures come from one sitting (not in the fan-in or the RSS phase);
#   - for the cold-key fan-in: one simulated Graph API per system
#     (`graphgate fake-graph --latency-ms 200`), which counts the calls it receives.
# and measures, alternating the targets within one run:
#   1. cache hits: wrk, 64 connections, ROUNDS x HIT_SECONDS per target (graphgate, nginx,
#      Varnish and the floor, alternating): req/s, p50, p99, and server CPU per hit
#      (utime+stime of the server's whole process tree from /proc, before and after,
#      divided by the requests served; utime alone as its user-space part); then
#      graphgate's (and the baseline's) CPU per hit over the floor's CPU per reply and over
#      nginx's, and its req/s over nginx's;
#      then the same over h2c (HTTP/2 without TLS, prior knowledge) for graphgate (its own
#      port serves both), nginx proxy_cache and the floor (`listen ... http2`), with h2load
#      (Debian: nghttp2-client; skipped when missing or with SKIP_H2C=1), one stream per
#      connection;
#      with IDLE_CONNS="1000 10000": the hits again (one run each, graphgate and nginx) while
#      examples/idle_conns holds that many more idle keep-alive connections open;
#   2. cold-key fan-in: 500 requests for one cold key at once (examples/burst.rs): p99, the
#      upstream calls made, and the added waiter latency (p99 minus one uncached request's
#      latency through the same system);
#   3. cache-miss overhead: p50 of unique-key requests on 1 connection, through each proxy
#      (and the baseline) vs direct to the static upstream;
#   4. graphgate RSS with ENTRIES (default 1 M) cached 1 KB entries, filled by unique-key
#      misses: total RSS over the payload bytes, and RSS growth per entry.
# Both caches are told to ignore Graph's `Cache-Control: private, no-store` (anyone putting
# them in front of Graph has to) and cache 200s for 60 s. Request logging: nginx access_log
# off, Varnish's shared-memory log (always on), graphgate log.level = "warn".
#
# Needs (Debian packages): nginx, varnish, wrk; plus cargo, curl, openssl, awk. Installs
# nothing. Usage:  benches/load/compare.sh        (env: ROUNDS, HIT_SECONDS, MISS_SECONDS,
#                                                   ENTRIES, BURST, PORT_BASE, GG_BASELINE,
#                                                   TARGETS, SKIP_BURST, SKIP_RSS, SKIP_H2C,
#                                                   IDLE_CONNS)
#   GG_BASELINE=/tmp/old/target/release/graphgate benches/load/compare.sh
#   TARGETS="graphgate nginx floor" SKIP_BURST=1 SKIP_RSS=1 benches/load/compare.sh
# TARGETS picks the hit (and miss-overhead) targets among: graphgate, graphgate-baseline
# (needs GG_BASELINE), nginx, varnish, floor, hyper-floor; default all (the baseline when
# GG_BASELINE is set); they run in that order within a round whatever the order given. SKIP_BURST=1 skips
# the fan-in (and its rows), SKIP_RSS=1 the RSS phase (filling 1 M entries takes minutes);
# targets not run print "-".
# The table reads its arrays by name (row), which shellcheck does not follow:
# shellcheck disable=SC2034
set -euo pipefail

ROUNDS=${ROUNDS:-2}
HIT_SECONDS=${HIT_SECONDS:-8}
MISS_SECONDS=${MISS_SECONDS:-5}
ENTRIES=${ENTRIES:-1000000}
BURST=${BURST:-500}
PORT_BASE=${PORT_BASE:-18080}
GG_BASELINE=${GG_BASELINE:-}
SKIP_BURST=${SKIP_BURST:-0}
SKIP_RSS=${SKIP_RSS:-0}
SKIP_H2C=${SKIP_H2C:-0}
IDLE_CONNS=${IDLE_CONNS:-}
if [ -z "${TARGETS:-}" ]; then
    TARGETS="graphgate nginx varnish floor hyper-floor"
    [ -z "$GG_BASELINE" ] || TARGETS+=" graphgate-baseline"
fi
read -ra TARGET_LIST <<<"$TARGETS"
for t in "${TARGET_LIST[@]}"; do
    case $t in
        graphgate | nginx | varnish | floor | hyper-floor) ;;
        graphgate-baseline) [ -n "$GG_BASELINE" ] || { echo "compare.sh: TARGETS names graphgate-baseline but GG_BASELINE is not set" >&2; exit 1; } ;;
        *) echo "compare.sh: unknown target '$t' in TARGETS (graphgate, graphgate-baseline, nginx, varnish, floor, hyper-floor)" >&2; exit 1 ;;
    esac
done
[ ${#TARGET_LIST[@]} -gt 0 ] || { echo "compare.sh: TARGETS is empty" >&2; exit 1; }
selected() { case " ${TARGET_LIST[*]} " in *" $1 "*) return 0 ;; esac; return 1; }
CONNS=64
# Room for IDLE_CONNS connections (each holder socket and each server socket).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# --- requirements -------------------------------------------------------------------------
find_cmd() { command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || true; }
NGINX=$(find_cmd nginx)
VARNISHD=$(find_cmd varnishd)
WRK=$(find_cmd wrk)
missing=()
[ -n "$NGINX" ] || missing+=(nginx)
[ -n "$VARNISHD" ] || missing+=(varnish)
[ -n "$WRK" ] || missing+=(wrk)
for c in cargo curl openssl awk; do command -v "$c" >/dev/null || missing+=("$c"); done
if [ -n "$GG_BASELINE" ] && [ ! -x "$GG_BASELINE" ]; then
    echo "compare.sh: GG_BASELINE=$GG_BASELINE is not an executable file" >&2
    exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "compare.sh: missing: ${missing[*]}" >&2
    echo "install with: sudo apt-get install nginx varnish wrk curl openssl gawk (and rustup for cargo)" >&2
    exit 1
fi

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
echo "building graphgate and the burst client (release)..." >&2
(cd "$ROOT" && cargo build --release --quiet --bin graphgate --example burst --example idle_conns --example hyper_floor)
GG="$TARGET/release/graphgate"
BURST_BIN="$TARGET/release/examples/burst"
IDLE_BIN="$TARGET/release/examples/idle_conns"
HYPER_FLOOR_BIN="$TARGET/release/examples/hyper_floor"

WORK=$(mktemp -d /tmp/gg-compare.XXXXXX)
chmod 755 "$WORK"   # Varnish's worker process runs as its own user and must reach its -n dir
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    # A graphgate holding a million entries takes a second or two to free them.
    for _ in $(seq 1 100); do
        alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

P_STATIC=$PORT_BASE                 # static upstream
P_NGINX=$((PORT_BASE + 1))          # nginx -> static
P_VARNISH=$((PORT_BASE + 2))        # varnish -> static
P_GG=$((PORT_BASE + 3))             # graphgate -> static (admin +4)
P_NGINX_SLOW=$((PORT_BASE + 5))     # nginx -> fake graph (nginx's)
P_VARNISH_SLOW=$((PORT_BASE + 6))   # varnish -> fake graph (varnish's)
P_GG_SLOW=$((PORT_BASE + 7))        # graphgate -> fake graph (graphgate's) (admin +8)
P_FLOOR=$((PORT_BASE + 9))          # nginx `return 200` with the same body (the floor)
P_F_NGINX=$((PORT_BASE + 10))       # fake graphs, one per system (each counts its calls)
P_F_VARNISH=$((PORT_BASE + 11))
P_F_GG=$((PORT_BASE + 12))
P_GG_BASE=$((PORT_BASE + 13))       # baseline graphgate -> static (admin +14), with GG_BASELINE
P_NGINX_H2=$((PORT_BASE + 15))      # nginx proxy_cache over h2c (graphgate serves h2c on its own port)
P_FLOOR_H2=$((PORT_BASE + 16))      # the floor over h2c
P_HYPER_FLOOR=$((PORT_BASE + 17))   # examples/hyper_floor with the same body (h1 and h2c)

KEY=cmp-client-key
FAKE_TOKEN=demo-system-user-token   # what `graphgate fake-graph` accepts
FAKE_SECRET=demo-app-secret
PROOF=$(printf '%s' "$FAKE_TOKEN" | openssl dgst -sha256 -hmac "$FAKE_SECRET" | awk '{print $NF}')
NODE_PATH="/v21.0/1001?fields=id,name,about,category,fan_count,link,description"
# The simulated Graph's Page node has no link/description: the fan-in asks for what it has.
SLOW_PATH="/v21.0/1001?fields=id,name,about,category,fan_count"

# --- the ~1 KB Graph-like node --------------------------------------------------------------
DESC=$(printf 'Small-batch roasts, single origins and seasonal blends; open seven days. %.0s' 1 2 3 4 5 6 7 8 9 10 11)
BODY="{\"id\":\"1001\",\"name\":\"Acme Coffee\",\"about\":\"Small-batch roasts - open 7/7\",\"category\":\"Coffee Shop\",\"fan_count\":12345,\"link\":\"https://www.facebook.com/1001\",\"description\":\"$DESC\"}"
# Pad the description to exactly 1024 bytes of JSON: the issue's "1 KB entries".
BODY="${BODY%\"\}}$(printf '%*s' $((1024 - ${#BODY})) '' | tr ' ' '.')\"}"
BODY_BYTES=${#BODY}
# The body as an nginx quoted string: `\` and `'` escaped. nginx has no escape for `$` (it
# would read a variable), so a body with one cannot be served by `return`.
case $BODY in *'$'*) echo "compare.sh: the body has a '\$'; nginx's return cannot serve it" >&2; exit 1 ;; esac
BODY_NGX=${BODY//\\/\\\\}
BODY_NGX=${BODY_NGX//\'/\\\'}

mkdir -p "$WORK/nginx-cache" "$WORK/nginx-tmp" "$WORK/logs"
cat >"$WORK/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 2;
user root;
pid $WORK/nginx.pid;
error_log $WORK/logs/nginx-error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 20000; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/nginx-tmp/body;
    proxy_temp_path $WORK/nginx-tmp/proxy;
    fastcgi_temp_path $WORK/nginx-tmp/fcgi;
    uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
    scgi_temp_path $WORK/nginx-tmp/scgi;
    proxy_cache_path $WORK/nginx-cache levels=1:2 keys_zone=gg:64m max_size=2g inactive=10m use_temp_path=off;
    upstream static { server 127.0.0.1:$P_STATIC; keepalive 64; }
    upstream slow { server 127.0.0.1:$P_F_NGINX; keepalive 64; }
    # The static upstream: Graph-like JSON node and usage header.
    server {
        listen 127.0.0.1:$P_STATIC;
        location / {
            default_type "application/json; charset=UTF-8";
            add_header X-Business-Use-Case-Usage '{"1001":[{"type":"pages","call_count":1,"total_cputime":1,"total_time":1,"estimated_time_to_regain_access":0}]}';
            add_header facebook-api-version v21.0;
            return 200 '$BODY_NGX';
        }
    }
    # The floor: the same body and Content-Type from memory, no proxy, no cache; also over
    # h2c (HTTP/2 without TLS, prior knowledge) on its own port.
    server {
        listen 127.0.0.1:$P_FLOOR;
        listen 127.0.0.1:$P_FLOOR_H2 http2;
        location / {
            default_type "application/json; charset=UTF-8";
            return 200 '$BODY_NGX';
        }
    }
    # nginx as the cache in front of it; also over h2c on its own port.
    server {
        listen 127.0.0.1:$P_NGINX;
        listen 127.0.0.1:$P_NGINX_H2 http2;
        location / {
            proxy_pass http://static;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache gg;
            proxy_cache_valid 200 60s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 30s;
            proxy_cache_lock_age 30s;
        }
    }
    server {
        listen 127.0.0.1:$P_NGINX_SLOW;
        location / {
            proxy_pass http://slow;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache gg;
            proxy_cache_valid 200 60s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 30s;
            proxy_cache_lock_age 30s;
        }
    }
}
EOF

vcl() { # backend port
    cat <<EOF
vcl 4.1;
backend default { .host = "127.0.0.1"; .port = "$1"; .first_byte_timeout = 30s; }
sub vcl_backend_response {
    if (beresp.status == 200) {
        unset beresp.http.Cache-Control;
        unset beresp.http.Set-Cookie;
        set beresp.ttl = 60s;
        set beresp.uncacheable = false;
        return (deliver);
    }
}
EOF
}
vcl "$P_STATIC" >"$WORK/static.vcl"
vcl "$P_F_VARNISH" >"$WORK/slow.vcl"

gg_conf() { # listen-port admin-port upstream-url
    cat <<EOF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
max_in_flight = 100000
max_connections = 100000
[upstream]
url = "$3"
timeout_ms = 30000
[credentials]
system_user_token = "$FAKE_TOKEN"
app_secret = "$FAKE_SECRET"
[cache]
max_bytes = 4294967296
default_ttl_s = 3600   # the memory phase fills for longer than a minute
[quota]
page_calls = 1000000000
app_calls = 1000000000
page_window_s = 1
max_queue_depth = 100000
queue_timeout_ms = 30000
[log]
level = "warn"
[[clients]]
name = "compare"
key = "$KEY"
pages = ["*"]
EOF
}
gg_conf "$P_GG" $((P_GG + 1)) "http://127.0.0.1:$P_STATIC" >"$WORK/gg.toml"
gg_conf "$P_GG_SLOW" $((P_GG_SLOW + 1)) "http://127.0.0.1:$P_F_GG" >"$WORK/gg-slow.toml"
gg_conf "$P_GG_BASE" $((P_GG_BASE + 1)) "http://127.0.0.1:$P_STATIC" >"$WORK/gg-baseline.toml"

wait_port() { # port
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listening on 127.0.0.1:$1; logs:" >&2
    tail -n 5 "$WORK"/logs/* >&2 || true
    exit 1
}

start_fake() { # port logfile -> pid
    "$GG" fake-graph --listen "127.0.0.1:$1" --latency-ms 200 --page-calls 100000000 >/dev/null 2>"$2" &
    echo $!
}

echo "starting servers..." >&2
"$NGINX" -e "$WORK/logs/nginx-error.log" -c "$WORK/nginx.conf" -p "$WORK" >"$WORK/logs/nginx.out" 2>&1 &
NGINX_PID=$!; PIDS+=("$NGINX_PID")
"$VARNISHD" -F -n "$WORK/v1" -a "127.0.0.1:$P_VARNISH" -f "$WORK/static.vcl" -s malloc,1g >"$WORK/logs/v1.out" 2>&1 &
VARNISH_PID=$!; PIDS+=("$VARNISH_PID")
"$VARNISHD" -F -n "$WORK/v2" -a "127.0.0.1:$P_VARNISH_SLOW" -f "$WORK/slow.vcl" -s malloc,256m >"$WORK/logs/v2.out" 2>&1 &
VARNISH_SLOW_PID=$!; PIDS+=("$VARNISH_SLOW_PID")
"$GG" --config "$WORK/gg.toml" serve >"$WORK/logs/gg.out" 2>&1 &
GG_PID=$!; PIDS+=("$GG_PID")
F_NGINX_PID=$(start_fake "$P_F_NGINX" "$WORK/logs/f-nginx.log"); PIDS+=("$F_NGINX_PID")
F_VARNISH_PID=$(start_fake "$P_F_VARNISH" "$WORK/logs/f-varnish.log"); PIDS+=("$F_VARNISH_PID")
F_GG_PID=$(start_fake "$P_F_GG" "$WORK/logs/f-gg.log"); PIDS+=("$F_GG_PID")
"$GG" --config "$WORK/gg-slow.toml" serve >"$WORK/logs/gg-slow.out" 2>&1 &
GG_SLOW_PID=$!; PIDS+=("$GG_SLOW_PID")
printf '%s' "$BODY" >"$WORK/body.json"
"$HYPER_FLOOR_BIN" "127.0.0.1:$P_HYPER_FLOOR" "$WORK/body.json" 2 >"$WORK/logs/hyper-floor.out" 2>&1 &
HYPER_FLOOR_PID=$!; PIDS+=("$HYPER_FLOOR_PID")
GG_BASE_PID=
if [ -n "$GG_BASELINE" ]; then
    "$GG_BASELINE" --config "$WORK/gg-baseline.toml" serve >"$WORK/logs/gg-baseline.out" 2>&1 &
    GG_BASE_PID=$!; PIDS+=("$GG_BASE_PID")
    wait_port "$P_GG_BASE"
fi
for p in $P_STATIC $P_NGINX $P_VARNISH $P_GG $P_FLOOR $P_HYPER_FLOOR $P_NGINX_H2 $P_FLOOR_H2 $P_NGINX_SLOW $P_VARNISH_SLOW $P_GG_SLOW $P_F_NGINX $P_F_VARNISH $P_F_GG; do
    wait_port "$p"
done

# --- helpers ---------------------------------------------------------------------------------
# Every pid in the tree under $1 (nginx workers, the Varnish child).
tree() {
    local p=$1
    echo "$p"
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do tree "$c"; done
}
# utime+stime of a process tree, in clock ticks.
cpu_ticks() {
    cpu_split "$1" | cut -d' ' -f1
}
# "utime+stime utime" of a process tree, in clock ticks.
cpu_split() {
    local sum=0 user=0
    for p in $(tree "$1"); do
        if [ -r "/proc/$p/stat" ]; then
            # Fields after the ")" of the command name: utime is the 12th, stime the 13th.
            local u k
            read -r u k < <(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}')
            sum=$((sum + u + k))
            user=$((user + u))
        fi
    done
    echo "$sum $user"
}
TICK=$(getconf CLK_TCK)

# wrk summary: "rps p50_ms p99_ms requests"
wrk_run() { # url seconds connections threads [lua]
    local script=()
    [ $# -ge 5 ] && script=(-s "$5")
    "$WRK" -t"$4" -c"$3" -d"$2"s --latency "${script[@]}" "$1" | awk '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /requests in/ { req = $1 }
        /Requests\/sec/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /Non-2xx/ { bad = $NF }
        END { printf "%s %.3f %.3f %s %s\n", rps, p50, p99, req, (bad == "" ? 0 : bad) }'
}

cat >"$WORK/unique.lua" <<'EOF'
-- Every request a new cache key: "&k=<run>-<thread>-<counter>" (the run part keeps
-- repeated runs, as in the memory phase, from asking for the keys of the run before).
local threads = 0
function setup(thread)
    thread:set("tid", threads)
    threads = threads + 1
end
function init(args)
    n = 0
    path = wrk.path .. "&k=" .. os.time() .. "-" .. tid .. "-"
end
function request()
    n = n + 1
    return wrk.format("GET", path .. n)
end
EOF

URL_N="http://127.0.0.1:$P_NGINX$NODE_PATH&access_token=$KEY"
URL_V="http://127.0.0.1:$P_VARNISH$NODE_PATH&access_token=$KEY"
URL_G="http://127.0.0.1:$P_GG$NODE_PATH&access_token=$KEY"
URL_F="http://127.0.0.1:$P_FLOOR$NODE_PATH&access_token=$KEY"
URL_B="http://127.0.0.1:$P_GG_BASE$NODE_PATH&access_token=$KEY"
URL_H="http://127.0.0.1:$P_HYPER_FLOOR$NODE_PATH&access_token=$KEY"
URL_DIRECT="http://127.0.0.1:$P_STATIC$NODE_PATH&access_token=$KEY"

# The floor must send what the upstream sends: the same body, byte for byte, and the same
# Content-Type.
curl -sf -D "$WORK/direct.h" -o "$WORK/direct.body" "$URL_DIRECT"
curl -sf -D "$WORK/floor.h" -o "$WORK/floor.body" "$URL_F"
if ! cmp -s "$WORK/direct.body" "$WORK/floor.body"; then
    echo "compare.sh: the floor's body differs from the upstream's:" >&2
    cmp "$WORK/direct.body" "$WORK/floor.body" >&2 || true
    exit 1
fi
ctype() { grep -i '^content-type:' "$1" | tr -d '\r'; }
if [ "$(ctype "$WORK/direct.h")" != "$(ctype "$WORK/floor.h")" ] || [ -z "$(ctype "$WORK/floor.h")" ]; then
    echo "compare.sh: Content-Type differs: upstream '$(ctype "$WORK/direct.h")', floor '$(ctype "$WORK/floor.h")'" >&2
    exit 1
fi
curl -sf -D "$WORK/hyper-floor.h" -o "$WORK/hyper-floor.body" "$URL_H"
if ! cmp -s "$WORK/direct.body" "$WORK/hyper-floor.body" ||
    [ "$(ctype "$WORK/direct.h" | tr '[:upper:]' '[:lower:]')" != "$(ctype "$WORK/hyper-floor.h" | tr '[:upper:]' '[:lower:]')" ]; then
    echo "compare.sh: the hyper floor's reply differs from the upstream's" >&2
    exit 1
fi

# The floor shares the nginx master with the proxy_cache server; only one of them is
# loaded at a time, so the tree's CPU is the loaded one's.
declare -A PID_OF=([nginx]=$NGINX_PID [varnish]=$VARNISH_PID [graphgate]=$GG_PID [floor]=$NGINX_PID [hyper-floor]=$HYPER_FLOOR_PID)
declare -A URL_OF=([nginx]=$URL_N [varnish]=$URL_V [graphgate]=$URL_G [floor]=$URL_F [hyper-floor]=$URL_H)
if [ -n "$GG_BASELINE" ]; then
    PID_OF[graphgate-baseline]=$GG_BASE_PID; URL_OF[graphgate-baseline]=$URL_B
fi
HIT_TARGETS=()    # those of TARGETS, in this order
for s in nginx varnish graphgate graphgate-baseline floor hyper-floor; do
    if selected "$s"; then HIT_TARGETS+=("$s"); fi
done
MISS_TARGETS=()   # the hit targets that are caches (not the floors)
for s in "${HIT_TARGETS[@]}"; do case $s in floor | hyper-floor) ;; *) MISS_TARGETS+=("$s") ;; esac; done

for s in "${HIT_TARGETS[@]}"; do
    for _ in 1 2 3; do curl -sf -o /dev/null "${URL_OF[$s]}"; done
    case $s in
        graphgate*) curl -s -D - -o /dev/null "${URL_OF[$s]}" | grep -qi '^x-cache: HIT' || { echo "$s is not serving hits" >&2; exit 1; } ;;
    esac
done

# Alternating rounds of hits: `runner` (wrk_run or h2_run: "rps p50 p99 requests non2xx")
# against each target in turn; the averages (req/s, p50), the worst p99 and the CPU per hit
# go into the arrays <prefix>RPS, <prefix>P50, <prefix>P99, <prefix>CPU_US and, of the CPU,
# the user-space part <prefix>USER_US.
hit_rounds() { # runner prefix urls-array targets...
    local runner=$1
    local -n rps_avg=${2}RPS p50_avg=${2}P50 p99_max=${2}P99 cpu_us=${2}CPU_US user_us=${2}USER_US urls=$3
    shift 3
    local -A ticks=() user=() reqs=()
    local round s before after user_before user_after rps p50 p99 req bad
    for s in "$@"; do rps_avg[$s]=0; p50_avg[$s]=0; p99_max[$s]=0; ticks[$s]=0; user[$s]=0; reqs[$s]=0; done
    for round in $(seq 1 "$ROUNDS"); do
        for s in "$@"; do
            read -r before user_before < <(cpu_split "${PID_OF[$s]}")
            read -r rps p50 p99 req bad < <("$runner" "${urls[$s]}" "$HIT_SECONDS" $CONNS 2)
            read -r after user_after < <(cpu_split "${PID_OF[$s]}")
            [ "$bad" = 0 ] || echo "  $s: $bad non-2xx replies" >&2
            echo "  round $round $s: $rps req/s p50 ${p50} ms p99 ${p99} ms cpu $((after - before)) ticks / $req req" >&2
            rps_avg[$s]=$(awk -v a="${rps_avg[$s]}" -v b="$rps" 'BEGIN{print a + b}')
            p50_avg[$s]=$(awk -v a="${p50_avg[$s]}" -v b="$p50" 'BEGIN{print a + b}')
            p99_max[$s]=$(awk -v a="${p99_max[$s]}" -v b="$p99" 'BEGIN{print (b > a ? b : a)}')
            ticks[$s]=$((ticks[$s] + after - before))
            user[$s]=$((user[$s] + user_after - user_before))
            reqs[$s]=$((reqs[$s] + req))
        done
    done
    for s in "$@"; do
        rps_avg[$s]=$(awk -v a="${rps_avg[$s]}" -v n="$ROUNDS" 'BEGIN{printf "%.0f", a / n}')
        p50_avg[$s]=$(awk -v a="${p50_avg[$s]}" -v n="$ROUNDS" 'BEGIN{printf "%.3f", a / n}')
        cpu_us[$s]=$(awk -v t="${ticks[$s]}" -v k="$TICK" -v r="${reqs[$s]}" 'BEGIN{printf "%.1f", t / k * 1e6 / r}')
        user_us[$s]=$(awk -v t="${user[$s]}" -v k="$TICK" -v r="${reqs[$s]}" 'BEGIN{printf "%.1f", t / k * 1e6 / r}')
    done
}

declare -A RPS P50 P99 CPU_US USER_US
echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "1/4 cache hits: $ROUNDS rounds x ${HIT_SECONDS}s per target (${HIT_TARGETS[*]}), $CONNS connections" >&2
hit_rounds wrk_run "" URL_OF "${HIT_TARGETS[@]}"

# The connection scale curve: hits (wrk, 64 connections, one run of HIT_SECONDS) while
# examples/idle_conns holds N more keep-alive connections open and idle on the same server.
declare -A IDLE_ROW
IDLE_LIST=()
if [ -n "$IDLE_CONNS" ]; then
    read -ra IDLE_LIST <<<"${IDLE_CONNS//,/ }"
    IDLE_TARGETS=()
    for s in graphgate nginx; do if selected "$s"; then IDLE_TARGETS+=("$s"); fi; done
    echo "idle connections: hits while ${IDLE_LIST[*]} idle keep-alive connections are held (${IDLE_TARGETS[*]})" >&2
    for n in "${IDLE_LIST[@]}"; do
        for s in "${IDLE_TARGETS[@]}"; do
            "$IDLE_BIN" "${URL_OF[$s]}" "$n" >"$WORK/idle.out" 2>&1 &
            holder=$!; PIDS+=("$holder")
            for _ in $(seq 1 600); do grep -q '^ready' "$WORK/idle.out" && break; sleep 0.1; done
            held=$(sed -n 's/^ready //p' "$WORK/idle.out")
            before=$(cpu_ticks "${PID_OF[$s]}")
            read -r rps p50 p99 req bad < <(wrk_run "${URL_OF[$s]}" "$HIT_SECONDS" $CONNS 2)
            after=$(cpu_ticks "${PID_OF[$s]}")
            kill -INT "$holder" 2>/dev/null || true
            wait "$holder" 2>/dev/null || true
            [ "$bad" = 0 ] || echo "  $s: $bad non-2xx replies" >&2
            cpu=$(awk -v t="$((after - before))" -v k="$TICK" -v r="$req" 'BEGIN{printf "%.1f", t / k * 1e6 / r}')
            echo "  $s with ${held:-0}/$n idle: $rps req/s p50 $p50 ms p99 $p99 ms cpu $cpu us/hit" >&2
            IDLE_ROW[$n,$s]="$(printf '%.0f' "$rps") | $p50 | $p99 | $cpu | ${held:-0}"
            sleep 1
        done
    done
fi

# h2c hits: h2load, 64 connections, one stream at a time each (as wrk's HTTP/1.1); latency
# percentiles from its per-request log. Same summary as wrk_run.
h2_run() { # url seconds connections threads
    local out rps ok bad
    out=$("$H2LOAD" -c "$3" -t "$4" -m 1 -D "$2" --log-file="$WORK/h2.log" "$1" 2>&1)
    rps=$(echo "$out" | sed -n 's/^finished in [0-9.]*s, \([0-9.]*\) req\/s.*/\1/p')
    ok=$(echo "$out" | sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p')
    # Replies other than 2xx: h2load's 3xx, 4xx and 5xx counts. (Its 2xx count can exceed
    # "succeeded" by the replies that arrived as the duration ended.)
    bad=$(echo "$out" | sed -n 's/^status codes: [0-9]* 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/\1 \2 \3/p' |
        awk '{print $1 + $2 + $3}')
    awk '{print $3}' "$WORK/h2.log" | sort -n | awk -v rps="$rps" -v ok="${ok:-0}" -v bad="${bad:-0}" \
        '{v[NR] = $1} END {printf "%s %.3f %.3f %s %s\n", rps, v[int(NR * 0.5)] / 1000, v[int(NR * 0.99)] / 1000, ok, bad}'
}
declare -A H2_RPS H2_P50 H2_P99 H2_CPU_US H2_USER_US
H2LOAD=$(find_cmd h2load)
if [ "$SKIP_H2C" = 1 ] || [ -z "$H2LOAD" ]; then
    echo "h2c hits: skipped ($([ -z "$H2LOAD" ] && echo "h2load not installed: apt-get install nghttp2-client" || echo SKIP_H2C=1))" >&2
    SKIP_H2C=1
else
    declare -A H2_URL=([graphgate]=$URL_G [nginx]="http://127.0.0.1:$P_NGINX_H2$NODE_PATH&access_token=$KEY" [floor]="http://127.0.0.1:$P_FLOOR_H2$NODE_PATH&access_token=$KEY" [hyper-floor]=$URL_H)
    H2_TARGETS=()
    for s in nginx graphgate floor hyper-floor; do if selected "$s"; then H2_TARGETS+=("$s"); fi; done
    echo "h2c hits: $ROUNDS rounds x ${HIT_SECONDS}s per target (${H2_TARGETS[*]}), $CONNS connections" >&2
    hit_rounds h2_run H2_ H2_URL "${H2_TARGETS[@]}"
fi

declare -A FAN_P99 SINGLE CALLS ADDED
if [ "$SKIP_BURST" = 1 ]; then
    echo "2/4 cold-key fan-in: skipped (SKIP_BURST=1)" >&2
else
    echo "2/4 cold-key fan-in: $BURST requests at once, 200 ms upstream" >&2
    fan() { # name base-url fake-pid fake-log  (base-url ends in '?...&' ready for k=)
        local name=$1 base=$2
        local single burst
        single=$("$BURST_BIN" "${base}k=single-$name" 1)
        echo "$single" | grep -q ' ok=1 ' || echo "  $name: the single request failed: $single" >&2
        single=$(echo "$single" | sed 's/.*p50_ms=\([0-9.]*\).*/\1/')
        burst=$("$BURST_BIN" "${base}k=burst-$name" "$BURST")
        echo "$burst" | grep -q " ok=$BURST " || echo "  $name: not every burst request got a 200" >&2
        echo "  $name: single uncached ${single} ms; burst: $burst" >&2
        SINGLE[$name]=$single
        FAN_P99[$name]=$(echo "$burst" | sed 's/.*p99_ms=\([0-9.]*\).*/\1/')
        kill -INT "$3"
        for _ in $(seq 1 50); do grep -q 'stopped' "$4" 2>/dev/null && break; sleep 0.1; done
        # Upstream calls for the burst = all calls minus the single request's one.
        CALLS[$name]=$(( $(sed -n 's/.*requests=\([0-9]*\).*/\1/p' "$4") - 1 ))
    }
    fan nginx "http://127.0.0.1:$P_NGINX_SLOW$SLOW_PATH&access_token=$FAKE_TOKEN&appsecret_proof=$PROOF&" "$F_NGINX_PID" "$WORK/logs/f-nginx.log"
    fan varnish "http://127.0.0.1:$P_VARNISH_SLOW$SLOW_PATH&access_token=$FAKE_TOKEN&appsecret_proof=$PROOF&" "$F_VARNISH_PID" "$WORK/logs/f-varnish.log"
    fan graphgate "http://127.0.0.1:$P_GG_SLOW$SLOW_PATH&access_token=$KEY&" "$F_GG_PID" "$WORK/logs/f-gg.log"
    for s in nginx varnish graphgate; do
        ADDED[$s]=$(awk -v a="${FAN_P99[$s]}" -v b="${SINGLE[$s]}" 'BEGIN{printf "%.1f", a - b}')
    done
fi

echo "3/4 cache-miss overhead: unique keys, 1 connection, ${MISS_SECONDS}s each" >&2
declare -A MISS_P50
read -r _ MISS_DIRECT _ _ _ < <(wrk_run "$URL_DIRECT" "$MISS_SECONDS" 1 1 "$WORK/unique.lua")
for s in "${MISS_TARGETS[@]}"; do
    read -r _ p50 _ _ bad < <(wrk_run "${URL_OF[$s]}" "$MISS_SECONDS" 1 1 "$WORK/unique.lua")
    [ "$bad" = 0 ] || echo "  $s: $bad non-2xx replies" >&2
    MISS_P50[$s]=$p50
done
declare -A MISS_OVER
for s in "${MISS_TARGETS[@]}"; do
    MISS_OVER[$s]=$(awk -v a="${MISS_P50[$s]}" -v b="$MISS_DIRECT" 'BEGIN{printf "%.0f", (a - b) * 1000}')
done
echo "  direct p50 ${MISS_DIRECT} ms;$(for s in "${MISS_TARGETS[@]}"; do printf ' %s %s' "$s" "${MISS_P50[$s]}"; done) ms" >&2

if [ "$SKIP_RSS" = 1 ]; then
    echo "4/4 graphgate RSS: skipped (SKIP_RSS=1)" >&2
else
    echo "4/4 graphgate RSS with $ENTRIES cached entries (unique-key misses until there)" >&2
    metric() { curl -s "http://127.0.0.1:$((P_GG + 1))/metrics" | awk -v m="$1" '$1 ~ "^"m"[{ ]" || $1 == m {s += $2} END {printf "%.0f", s}'; }
    rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$GG_PID/status"; }
    entries0=$(metric 'graphgate_cache_entries')
    rss0=$(rss_kb)
    FILL_START=$(date +%s)
    while [ "$(metric 'graphgate_cache_entries')" -lt "$ENTRIES" ] && [ $(( $(date +%s) - FILL_START )) -lt 600 ]; do
        wrk_run "$URL_G" 10 16 2 "$WORK/unique.lua" >/dev/null
    done
    sleep 1
    entries1=$(metric 'graphgate_cache_entries')
    rss1=$(rss_kb)
    FILLED=$((entries1 - entries0))
    PER_ENTRY=$(awk -v a="$rss0" -v b="$rss1" -v n="$FILLED" 'BEGIN{printf "%.0f", (b - a) * 1024 / n}')
    PER_ENTRY_RATIO=$(awk -v p="$PER_ENTRY" -v b="$BODY_BYTES" 'BEGIN{printf "%.2f", p / b}')
    RSS_RATIO=$(awk -v r="$rss1" -v n="$entries1" -v b="$BODY_BYTES" 'BEGIN{printf "%.2f", r * 1024 / (n * b)}')
    echo "  $FILLED entries in $(( $(date +%s) - FILL_START )) s: RSS $((rss0 / 1024)) MB -> $((rss1 / 1024)) MB" >&2
fi

# --- the table ---------------------------------------------------------------------------------
# a / b to two places; "-" when either is not a number or b is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ n = "^-?[0-9]+([.][0-9]*)?$"; if (a !~ n || b !~ n || b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
COLS=(graphgate nginx varnish floor hyper-floor)
GGS=()   # the graphgates the summary lines are for
for g in graphgate graphgate-baseline; do if selected "$g"; then GGS+=("$g"); fi; done
RATIO_HEADS=("gg/nginx" "gg/Varnish")
if [ -n "$GG_BASELINE" ]; then
    COLS=(graphgate graphgate-baseline nginx varnish floor hyper-floor)
    RATIO_HEADS+=("gg/baseline")
fi
declare -A HEAD=([graphgate]=graphgate [graphgate-baseline]=gg-baseline [nginx]=nginx [varnish]=Varnish [floor]="nginx floor" [hyper-floor]="hyper floor")
row() { # label array-name: one value per column from the array ("-" where unmeasured)
    local -n v=$2
    local c
    printf '| %-44s |' "$1"
    for c in "${COLS[@]}"; do printf ' %11s |' "${v[$c]:--}"; done
    printf ' %11s | %11s |' "$(ratio "${v[graphgate]:--}" "${v[nginx]:--}")" "$(ratio "${v[graphgate]:--}" "${v[varnish]:--}")"
    [ -z "$GG_BASELINE" ] || printf ' %11s |' "$(ratio "${v[graphgate]:--}" "${v[graphgate-baseline]:--}")"
    echo
}
echo
echo "graphgate vs nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///') proxy_cache vs Varnish $("$VARNISHD" -V 2>&1 | head -1 | sed 's/.*varnish-\([0-9.]*\).*/\1/'), loopback, $(nproc) cores; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "body ${BODY_BYTES} B; hits: wrk -t2 -c$CONNS, ${ROUNDS}x${HIT_SECONDS}s per target alternating; fan-in: $BURST at once, 200 ms upstream"
echo "nginx floor: the same body and Content-Type by nginx \`return 200\` from memory (no proxy, no cache)"
echo "hyper floor: the same body from memory by examples/hyper_floor (graphgate's server layout, no stack, no cache)"
[ -z "$GG_BASELINE" ] || echo "gg-baseline: $GG_BASELINE, same config, hits and miss overhead only"
echo
printf '| %-44s |' "measure"
for c in "${COLS[@]}"; do printf ' %11s |' "${HEAD[$c]}"; done
for h in "${RATIO_HEADS[@]}"; do printf ' %11s |' "$h"; done
echo
printf '|%s|' "----------------------------------------------"
for c in "${COLS[@]}"; do printf '%s|' "-------------"; done
for h in "${RATIO_HEADS[@]}"; do printf '%s|' "-------------"; done
echo
row "cache hits, req/s (64 conns)" RPS
row "cache hit p50, ms" P50
row "cache hit p99, ms (worst round)" P99
row "server CPU per hit, us" CPU_US
row "  of which user space, us" USER_US
if [ "$SKIP_BURST" != 1 ]; then
    row "fan-in $BURST cold: p99, ms" FAN_P99
    row "fan-in: single uncached request, ms" SINGLE
    row "fan-in: added waiter latency (p99-single), ms" ADDED
    row "fan-in: upstream calls" CALLS
fi
row "miss overhead vs direct (p50), us" MISS_OVER
if [ "$SKIP_H2C" != 1 ]; then
    row "h2c hits, req/s (64 conns, 1 stream each)" H2_RPS
    row "h2c hit p50, ms" H2_P50
    row "h2c hit p99, ms (worst round)" H2_P99
    row "h2c server CPU per hit, us" H2_CPU_US
    row "  of which user space, us" H2_USER_US
fi
echo
for g in "${GGS[@]}"; do
    echo "$g: CPU per hit / floor CPU per reply $(ratio "${CPU_US[$g]:--}" "${CPU_US[floor]:--}"); / hyper floor's $(ratio "${CPU_US[$g]:--}" "${CPU_US[hyper-floor]:--}"); CPU per hit / nginx proxy_cache's $(ratio "${CPU_US[$g]:--}" "${CPU_US[nginx]:--}"); hit req/s / nginx proxy_cache's $(ratio "${RPS[$g]:--}" "${RPS[nginx]:--}")"
done
echo "direct to the static upstream, unique keys, 1 connection: p50 ${MISS_DIRECT} ms"
if [ ${#IDLE_LIST[@]} -gt 0 ]; then
    echo
    echo "hits (wrk -c$CONNS, ${HIT_SECONDS}s) while N idle keep-alive connections are held:"
    echo "| idle connections | target | req/s | p50, ms | p99, ms | CPU per hit, us | held |"
    echo "|---|---|---|---|---|---|---|"
    for n in "${IDLE_LIST[@]}"; do
        for s in "${IDLE_TARGETS[@]}"; do echo "| $n | $s | ${IDLE_ROW[$n,$s]} |"; done
    done
fi
if [ "$SKIP_RSS" != 1 ]; then
    echo "graphgate memory: $entries1 cached entries of a ${BODY_BYTES} B body ($((entries1 * BODY_BYTES / 1048576)) MiB of payload):"
    echo "  RSS $((rss1 / 1024)) MiB = ${RSS_RATIO}x the payload; growth while filling: $PER_ENTRY B per entry = ${PER_ENTRY_RATIO}x"
fi
