#!/usr/bin/env bash
# A demo cluster on this machine: two moeshard-worker processes on loopback hold every expert of
# the bundled model, the coordinator ships them their weights, answers a chat request, and prints
# the traffic per worker. Usage: examples/demo-cluster.sh [MODEL.gguf] [PROMPT]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tests/fixtures/kq-mellum-q4_k_m.gguf}
PROMPT=${2:-Write a Python function that reverses a list}
cargo build --release --quiet --bin moeshard --bin moeshard-worker
BIN=target/release
DIR=$(mktemp -d)
MOESHARD_CLUSTER_KEY=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export MOESHARD_CLUSTER_KEY
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

addr() { # waits for a worker's "listening on ADDR ..." line
  for _ in $(seq 100); do
    if read -r _ _ a _ < "$DIR/$1.out" 2>/dev/null && [ -n "${a:-}" ]; then echo "$a"; return; fi
    sleep 0.1
  done
  echo "worker $1 did not start" >&2; exit 1
}
for w in w1 w2; do
  "$BIN/moeshard-worker" --listen 127.0.0.1:0 --no-mdns --name "$w" --cache-dir "$DIR/$w" --threads 1 > "$DIR/$w.out" &
done
W1=$(addr w1); W2=$(addr w2)
echo '* * w1,w2' > "$DIR/placement"   # every layer: first half of the experts on w1, second half on w2
echo "workers: w1 at $W1, w2 at $W2; the coordinator keeps no experts" >&2
"$BIN/moeshard" run -m "$MODEL" --worker "$W1" --worker "$W2" --no-discovery --placement "$DIR/placement" \
  --chat "$PROMPT" -n 48 --temp 0.7 --stats
