#!/usr/bin/env bash
# The cluster's MLflow tracking server, on the head node, on the private interface only.
#
#     cluster/start_mlflow.sh HEAD_PRIVATE_IP [STORE_DIR]      # STORE_DIR default /shared/mlflow
#
# Every node's training workers log to http://HEAD_PRIVATE_IP:5000 (rank 0 may run on any node), so
# the server listens on the private interface, never 0.0.0.0 or a public address; look at it from
# your laptop through an SSH port-forward (cluster/README.md). Runs and artifacts are kept on the
# shared storage (an sqlite file and a folder), so they survive a restart of the head.
# Idempotent: a server already answering on that address is left alone.
set -euo pipefail
host="${1:?usage: start_mlflow.sh HEAD_PRIVATE_IP [STORE_DIR]}"
store="${2:-/shared/mlflow}"
port="${MLFLOW_PORT:-5000}"
case "$host" in
    0.0.0.0|::|"*") echo "start_mlflow.sh: refusing to listen on every interface ($host): give the head's private IP" >&2; exit 2 ;;
esac
if curl -fsS "http://$host:$port/health" >/dev/null 2>&1; then
    echo "MLflow already serving at http://$host:$port"
    exit 0
fi
mkdir -p "$store/artifacts"
nohup mlflow server --host "$host" --port "$port" --workers 2 \
    --backend-store-uri "sqlite:///$store/mlflow.db" --artifacts-destination "$store/artifacts" \
    >"$store/server.log" 2>&1 &
echo $! >"$store/server.pid"
for _ in $(seq 1 60); do
    if curl -fsS "http://$host:$port/health" >/dev/null 2>&1; then
        echo "MLflow serving at http://$host:$port (store $store, log $store/server.log)"
        exit 0
    fi
    sleep 1
done
echo "start_mlflow.sh: MLflow did not answer at http://$host:$port within 60 s; see $store/server.log" >&2
exit 1
