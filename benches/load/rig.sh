# shellcheck shell=bash
# Sourced by burst_compare.sh, miss_cpu.sh and new_connections.sh: what their rigs share, a
# scratch directory and the processes to stop, and the configuration files of graphgate and
# of nginx as a plain reverse proxy in front of the simulated Graph API on 127.0.0.1. Not a
# script of its own.

# Sets WORK (a new directory under /tmp named after NAME) and PIDS (empty: add what you
# start); both are cleaned up when the calling script exits.
rig_start() { # name
    WORK=$(mktemp -d "/tmp/gg-$1.XXXXXX")
    PIDS=()
    trap rig_cleanup EXIT
}

rig_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}

# graphgate's configuration: listen on PORT (admin on PORT + 1), Graph at GRAPH_PORT, one
# client with KEY for every Page; EXTRA (TOML) is appended.
write_graphgate_conf() { # file port graph_port key [extra]
    cat >"$1" <<CONF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$(($2 + 1))"
[upstream]
url = "http://127.0.0.1:$3"
[credentials]
system_user_token = "demo-system-user-token"
app_secret = "demo-app-secret"
[log]
level = "warn"
[[clients]]
name = "bench"
key = "$4"
pages = ["*"]
${5:-}
CONF
}

# nginx (two workers) as a plain reverse proxy on PORT: proxy_pass with a keep-alive pool to
# Graph at GRAPH_PORT, no cache. Its pid file, logs and temp files go under DIR.
write_nginx_proxy_conf() { # dir port graph_port
    mkdir -p "$1/tmp" "$1/logs"
    cat >"$1/nginx.conf" <<CONF
daemon off;
master_process on;
worker_processes 2;
user root;
pid $1/nginx.pid;
error_log $1/logs/nginx-error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
    upstream graph { server 127.0.0.1:$3; keepalive 512; }
    server {
        listen 127.0.0.1:$2;
        location / {
            proxy_pass http://graph;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
}

# Waits until something answers at URL (10 s), else stops the calling script.
wait_for() { # url
    for _ in $(seq 1 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
    echo "$(basename "$0"): nothing answers at $1" >&2
    exit 1
}
