#!/usr/bin/env bash
# Benchmark of the preview proxy against direct access and an nginx reference, on this machine.
#
# An upstream (examples/testapp, in a container built with `docker import`) is reached:
#   direct  — wrk to the container's port, published on 127.0.0.1
#   proxy   — wrk to previewd's proxy, a `via: direct` link to the container
#   agent   — wrk to previewd's proxy, a `via: agent` link: as root beside the engine,
#             previewd connects inside the container's network namespace (status.route says
#             `netns:`), else through the agent as `relay` does
#   relay   — wrk to a second previewd run with --enter-netns false --socket-handoff false,
#             a `via: agent` link through the injected agent's relay (built with the `agent`
#             size profile as shipped; its own CPU per request is reported too, its host pid
#             from `docker top`)
#   handoff — wrk to a third previewd run as nobody in the group of the engine's socket (a
#             developer in `docker`: it may not enter namespaces), a `via: agent` link on
#             sockets the agent's helper connects in the container and hands over
#   default — wrk to previewd's proxy, a link with no `via` (auto: the app listens on
#             0.0.0.0, so it should go direct)
#   ref     — wrk to nginx (keepalive upstream, as a tuned reverse proxy) proxying the container
# with ../shared/tools/proxy_bench.sh (interleaved rounds; ratios from one run), at 32
# connections and at 1 connection (added latency), with CPU per request for previewd and nginx.
#
# With --instructions it counts instead, under valgrind's callgrind, the user-space
# instructions previewd's proxy workers and a single-process nginx execute per request while
# wrk loads the direct link and nginx in turn, and prints the ratio. Counts do not depend on
# what else the machine is doing, so they show small changes that CPU time on a shared
# machine hides (the kernel's share, most of either's CPU, is not counted).
#
# Usage: bench/proxy.sh [--instructions] [path to proxy_bench.sh]   (env: ROUNDS=3; needs
# Docker, nginx, wrk, and valgrind for --instructions; installs nginx and wrk with apt-get
# when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=cpu
ROUNDS=${ROUNDS:-3}
if [ "${1:-}" = --instructions ]; then MODE=instructions; shift; fi
BENCH_TOOL=${1:-../shared/tools/proxy_bench.sh}
if [ $MODE = cpu ]; then
  [ -x "$BENCH_TOOL" ] || { echo "proxy_bench.sh not found at $BENCH_TOOL" >&2; exit 2; }
  NGINX_PROCESSES='worker_processes auto;'
else
  command -v valgrind >/dev/null || apt-get install -y valgrind >/dev/null
  NGINX_PROCESSES='worker_processes 1; master_process off;'
fi
command -v nginx >/dev/null && command -v wrk >/dev/null || apt-get install -y nginx wrk >/dev/null

cargo build --release --bins --examples -q
# The agent injected is the one that ships: the size profile (Cargo.toml's `agent`).
cargo build --profile agent --bin previewd-agent -q
BIN=target/x86_64-unknown-linux-gnu/release
AGENT_BINARY=target/x86_64-unknown-linux-gnu/agent/previewd-agent
echo "agent binary: $(stat -c %s "$AGENT_BINARY") bytes (profile agent)"
WORK=$(mktemp -d)
NAME=previewd-bench-$$
cleanup() {
  [ -n "${NGINX_PID:-}" ] && kill "$NGINX_PID" 2>/dev/null || true
  [ -n "${PREVIEWD_PID:-}" ] && kill "$PREVIEWD_PID" 2>/dev/null || true
  [ -n "${RELAY_PID:-}" ] && kill "$RELAY_PID" 2>/dev/null || true
  [ -n "${HANDOFF_PID:-}" ] && kill "$HANDOFF_PID" 2>/dev/null || true
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
VALGRIND=()
if [ $MODE = instructions ]; then
  VALGRIND=(valgrind -q --tool=callgrind --separate-threads=yes "--callgrind-out-file=$WORK/callgrind.out.%p")
fi

# The upstream: the static testapp alone in an imported image, port published on loopback.
mkdir -p "$WORK/rootfs/etc" "$WORK/rootfs/tmp"
cp "$BIN/examples/testapp" "$WORK/rootfs/testapp"
echo 'root:x:0:0:root:/:/testapp' > "$WORK/rootfs/etc/passwd"
tar -C "$WORK/rootfs" --owner=0 --group=0 -cf - . | docker import -c 'ENTRYPOINT ["/testapp"]' - previewd-bench/testapp:latest >/dev/null
docker run -d --name "$NAME" -p 127.0.0.1::8080 previewd-bench/testapp:latest 0.0.0.0:8080 >/dev/null
IP=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$NAME")
DIRECT_PORT=$(docker port "$NAME" 8080/tcp | head -n1 | sed 's/.*://')

# previewd, with both links.
API=127.0.0.1:18101 PROXY=127.0.0.1:18102
PREVIEWD_AGENT_BINARY=$AGENT_BINARY PREVIEWD_PATH_URLS=true RUST_LOG=warn \
  "${VALGRIND[@]}" "$BIN/previewd" serve --api-listen $API --proxy-listen $PROXY --state-dir "$WORK/state" &
PREVIEWD_PID=$!
for _ in $(seq 300); do curl -sf "http://$API/readyz" >/dev/null && break; sleep 0.1; done
"$BIN/previewd" apply --server "http://$API" -f - >/dev/null <<YAML
apiVersion: previewd.dev/v1alpha1
kind: PreviewLink
metadata: {name: direct}
spec: {target: {docker: {container: $NAME}}, port: 8080, via: direct, access: public}
---
apiVersion: previewd.dev/v1alpha1
kind: PreviewLink
metadata: {name: agent}
spec: {target: {docker: {container: $NAME}}, port: 8080, via: agent, access: public}
---
apiVersion: previewd.dev/v1alpha1
kind: PreviewLink
metadata: {name: default}
spec: {target: {docker: {container: $NAME}}, port: 8080, access: public}
YAML
for _ in $(seq 100); do
  curl -sf "http://$PROXY/p/direct.default/" >/dev/null && curl -sf "http://$PROXY/p/agent.default/" >/dev/null &&
    curl -sf "http://$PROXY/p/default.default/" >/dev/null && break
  sleep 0.2
done
echo "default link: $(kubectl --server "http://$API" get pl default -o jsonpath='{.status.route}' 2>/dev/null || true)"
echo "agent link: $(kubectl --server "http://$API" get pl agent -o jsonpath='{.status.route}' 2>/dev/null || true)"

# Starts another previewd (after `env` and any command in front of it, e.g. setpriv), with a
# `via: agent` link `agent` in namespace NS, so its agent is installed apart from the first
# previewd's (/.previewd/NS.*); leaves its pid in $! and prints the link's route.
#   agent_link_on NS API PROXY [command...]
agent_link_on() {
  local ns=$1 api=$2 proxy=$3
  shift 3
  PREVIEWD_AGENT_BINARY=$AGENT_BINARY PREVIEWD_PATH_URLS=true RUST_LOG=warn \
    "$@" "$BIN/previewd" serve --api-listen "$api" --proxy-listen "$proxy" --state-dir "$WORK/$ns-state" &
  for _ in $(seq 300); do curl -sf "http://$api/readyz" >/dev/null && break; sleep 0.1; done
  "$BIN/previewd" apply --server "http://$api" -f - >/dev/null <<YAML
apiVersion: previewd.dev/v1alpha1
kind: PreviewLink
metadata: {name: agent, namespace: $ns}
spec: {target: {docker: {container: $NAME}}, port: 8080, via: agent, access: public}
YAML
  for _ in $(seq 100); do curl -sf "http://$proxy/p/agent.$ns/" >/dev/null && break; sleep 0.2; done
  echo "$ns link: $(kubectl --server "http://$api" -n "$ns" get pl agent -o jsonpath='{.status.route}' 2>/dev/null || true)"
}

# A second previewd that never enters namespaces nor takes handed-over sockets: its link goes
# through the agent's relay.
RELAY_API=127.0.0.1:18111 RELAY_PROXY=127.0.0.1:18112
agent_link_on relay $RELAY_API $RELAY_PROXY env PREVIEWD_ENTER_NETNS=false PREVIEWD_SOCKET_HANDOFF=false
RELAY_PID=$!
AGENT_PID=$(docker top "$NAME" -eo pid,args | awk '/previewd-agent serve/ && /\/\.previewd\/relay\./ {print $1; exit}')

# A third previewd as nobody, in the group that may use the engine's socket: its link gets
# sockets handed over by the agent's helper.
HANDOFF_API=127.0.0.1:18121 HANDOFF_PROXY=127.0.0.1:18122
mkdir -p "$WORK/handoff-state" && chown 65534:65534 "$WORK/handoff-state" && chmod 711 "$WORK"
agent_link_on handoff $HANDOFF_API $HANDOFF_PROXY setpriv --reuid=65534 --regid=65534 \
  --groups="$(stat -c %g /var/run/docker.sock)" --inh-caps=-all
HANDOFF_PID=$!

# nginx as a tuned reverse proxy to the same container.
cat > "$WORK/nginx.conf" <<CONF
$NGINX_PROCESSES
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  upstream app { server $IP:8080; keepalive 64; }
  server {
    listen 127.0.0.1:18103;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
"${VALGRIND[@]}" nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
for _ in $(seq 300); do curl -sf http://127.0.0.1:18103/ >/dev/null && break; sleep 0.1; done

if [ $MODE = instructions ]; then
  # Instructions per request of one process under callgrind: counters zeroed after a
  # warm-up, dumped after a measured wrk run, summed over `files` (a pattern in $WORK).
  count() {
    local pid=$1 url=$2 files=$3 requests total
    wrk -t1 -c8 -d3 "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    requests=$(wrk -t1 -c8 -d10 "$url" | awk '/requests in/ {print $1}')
    callgrind_control -d "$pid" >/dev/null
    sleep 1
    # previewd: only its proxy worker threads (each thread's dump names what it ran).
    total=$(grep -l -e 'accept_loop' -e 'ngx_' "$WORK"/$files | xargs grep -h '^totals:' | awk '{s += $2} END {print s}')
    echo $((total / requests))
  }
  PD=$(count "$PREVIEWD_PID" "http://$PROXY/p/direct.default/" "callgrind.out.$PREVIEWD_PID.1-*")
  NG=$(count "$NGINX_PID" http://127.0.0.1:18103/ "callgrind.out.$NGINX_PID.1*")
  echo "user-space instructions per request: previewd $PD, nginx $NG"
  awk -v p="$PD" -v n="$NG" 'BEGIN { printf "previewd/nginx instructions per request: %.2f\n", p / n }'
  exit 0
fi

echo "== 32 connections: previewd (direct link) vs direct vs nginx; agent, relay, handoff and default links as extras =="
# previewd's own CPU per request is reported for its agent and default links too: on a
# shared machine it moves less than throughput does.
"$BENCH_TOOL" -c 32 -d 8 -n "$ROUNDS" -P "$PREVIEWD_PID" -R "$NGINX_PID" -r http://127.0.0.1:18103/ \
  -x "agent=http://$PROXY/p/agent.default/" -p "agent=$PREVIEWD_PID" \
  -x "relay=http://$RELAY_PROXY/p/agent.relay/" ${AGENT_PID:+-p "relay=$AGENT_PID"} \
  -x "handoff=http://$HANDOFF_PROXY/p/agent.handoff/" -p "handoff=$HANDOFF_PID" \
  -x "default=http://$PROXY/p/default.default/" -p "default=$PREVIEWD_PID" \
  "http://$PROXY/p/direct.default/" "http://127.0.0.1:$DIRECT_PORT/"
echo
echo "== 1 connection: added latency =="
"$BENCH_TOOL" -t 1 -c 1 -d 5 -n "$ROUNDS" -r http://127.0.0.1:18103/ \
  -x "agent=http://$PROXY/p/agent.default/" -x "relay=http://$RELAY_PROXY/p/agent.relay/" \
  -x "handoff=http://$HANDOFF_PROXY/p/agent.handoff/" -x "default=http://$PROXY/p/default.default/" \
  "http://$PROXY/p/direct.default/" "http://127.0.0.1:$DIRECT_PORT/"
