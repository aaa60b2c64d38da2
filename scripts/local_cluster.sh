#!/usr/bin/env bash
# A two-node Ray cluster on this one machine, with Ray's token authentication: a head and a worker node, each
# its own raylet, node id and temp dir. For trying the cluster path of tune.py (and its test) without a second
# machine; on real machines run the same `ray start` lines on each node (see docs/tuning.md).
#
#   scripts/local_cluster.sh start         head + worker; prints the address and the environment to use
#   scripts/local_cluster.sh status        the nodes Ray sees
#   scripts/local_cluster.sh kill-worker   SIGKILL every process of the worker node (a lost machine)
#   scripts/local_cluster.sh stop          SIGKILL every process of both nodes
#
# $LMCORE_CLUSTER_DIR (default /tmp/lmcore-cluster-$USER) holds the token, the nodes' temp dirs and
# cluster.env; keep it short (Ray's socket paths must fit 107 characters). $CLUSTER_CPUS (per node, default 1)
# and $CLUSTER_GPUS (logical GPUs per node, default 0). Each node is started in a session of its own (its id in
# <dir>/<node>.sid): stop kills exactly that session's processes, by pid, never `ray stop` (which would stop
# every Ray of this user on the machine).
set -euo pipefail
DIR="${LMCORE_CLUSTER_DIR:-/tmp/lmcore-cluster-${USER:-$(id -un)}}"
PYTHON="${PYTHON:-python3}"
RAY=("$PYTHON" -m ray.scripts.scripts)

free_ports() {  # N ports nobody listens on now
    "$PYTHON" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

node_pids() {  # pids of the live processes of node $1 (head | worker): those in the session it was started in
    local sid
    sid=$(cat "$DIR/$1.sid" 2>/dev/null) || return 0
    ps -eo pid=,sid=,stat= | awk -v sid="$sid" '$2 == sid && $3 !~ /^Z/ {print $1}'
}

kill_node() {  # SIGKILL node $1's processes until none is left (a dying raylet may still be forking)
    local pids
    for _ in $(seq 50); do
        pids=$(node_pids "$1")
        [ -z "$pids" ] && return 0
        kill -9 $pids 2>/dev/null || true
        sleep 0.2
    done
    echo "processes of the $1 node still alive: $(node_pids "$1")" >&2
    return 1
}

start_node() {  # start_node NAME RAY-START-ARGS...: one node with its own temp dir and ports
    local name="$1"; shift
    local ports; read -r -a ports <<< "$(free_ports 7)"
    mkdir -p "$DIR/$name"
    # A session of its own: every process Ray starts for this node stays in it, found by its id.
    # Its own corpus cache, as on a machine of its own (set LMCORE_DATA_DIR so that it finds the data).
    LMCORE_CACHE_DIR="$DIR/$name/cache" \
    setsid bash -c 'echo $$ > "$0"; exec "$@"' "$DIR/$name.sid" "${RAY[@]}" start "$@" \
        --num-cpus "${CLUSTER_CPUS:-1}" --num-gpus "${CLUSTER_GPUS:-0}" \
        --node-ip-address 127.0.0.1 --temp-dir "$DIR/$name" --disable-usage-stats \
        --node-manager-port "${ports[0]}" --object-manager-port "${ports[1]}" \
        --dashboard-agent-listen-port "${ports[2]}" --dashboard-agent-grpc-port "${ports[3]}" \
        --runtime-env-agent-port "${ports[4]}" --metrics-export-port "${ports[5]}" \
        > "$DIR/$name.log" 2>&1 || { cat "$DIR/$name.log" >&2; return 1; }
}

start() {
    if [ -f "$DIR/cluster.env" ] && [ -n "$(node_pids head)" ]; then
        echo "a cluster is already running from $DIR: $0 stop first" >&2
        exit 2
    fi
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    # One token for every node and every driver: Ray reads it from $RAY_AUTH_TOKEN_PATH.
    [ -s "$DIR/token" ] || (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/token"
    local port client
    read -r port client <<< "$(free_ports 2)"
    start_node head --head --port "$port" --ray-client-server-port "$client" --include-dashboard=false \
        || { kill_node head; exit 1; }
    start_node worker --address "127.0.0.1:$port" || { kill_node worker; kill_node head; exit 1; }
    cat > "$DIR/cluster.env" <<ENV
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$DIR/token
export RAY_ADDRESS=127.0.0.1:$port
ENV
    echo "cluster up: head + worker node at 127.0.0.1:$port"
    echo "  source $DIR/cluster.env   # RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_ADDRESS"
    echo "  python tune.py experiments/quickstart.yaml --address 127.0.0.1:$port"
}

status() {
    [ -f "$DIR/cluster.env" ] || { echo "no cluster in $DIR"; exit 1; }
    # shellcheck disable=SC1091
    source "$DIR/cluster.env"
    "${RAY[@]}" status --address "$RAY_ADDRESS"
}

case "${1:-}" in
    start) start ;;
    status) status ;;
    kill-worker) kill_node worker ;;
    stop) kill_node worker; kill_node head; rm -f "$DIR/cluster.env"; echo "cluster in $DIR stopped" ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
esac
