#!/usr/bin/env bash
# The main job: start the local cluster and serve the default model over gRPC, answer one prompt
# through the client, then stop the server (drain, nothing left running).
set -euo pipefail
cd "$(dirname "$0")/.."
CLI=.venv/bin/yuan-serve
PORT=${PORT:-50051}
PROMPT=${1:-"Hello, Yuan"}
"$CLI" up --port "$PORT" --pools 4 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
"$CLI" client --target "127.0.0.1:$PORT" --wait-ready 300 --max-tokens 32 --temperature 0.7 --seed 1 "$PROMPT"
"$CLI" client --target "127.0.0.1:$PORT" --max-tokens 8 --json "$PROMPT"
