#!/usr/bin/env bash
# `make demo`: Redis and Postgres (started or reused), migrations, the mock LLM provider (or
# OpenAI when OPENAI_API_KEY is set), two workers and the scheduler, sample tasks, the
# cross-review chain, then results, status and costs. Leaves Redis and Postgres running; stops
# what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/llmq}"
QUEUE=demo
DIR=.demo
mkdir -p "$DIR"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Redis and Postgres"
deploy/services.sh

step "Building llmq"
cargo build --workspace --bins --quiet
BIN=target/debug
"$BIN/llmq" migrate

if [ -n "${OPENAI_API_KEY:-}" ]; then
  step "Provider: OpenAI (OPENAI_API_KEY is set)"
  export LLMQ_CONFIG=examples/providers.openai.yaml
  SAMPLES=examples/tasks.openai.json
else
  step "Provider: llmq-mock (no API key set)"
  "$BIN/llmq-mock" --listen 127.0.0.1:0 --latency 30ms >"$DIR/mock.out" 2>"$DIR/mock.log" &
  PIDS+=($!)
  for _ in $(seq 1 50); do grep -q listening "$DIR/mock.out" 2>/dev/null && break; sleep 0.1; done
  export LLMQ_MOCK_URL; LLMQ_MOCK_URL=$(sed -n 's/.*listening on //p' "$DIR/mock.out")
  echo "llmq-mock at $LLMQ_MOCK_URL"
  # The mock's reviewer answers the chain's code reviews with a verdict.
  { cat examples/providers.mock.yaml
    printf '  rules:\n    - {task_type: code_review, model: mock/review-approve}\n'; } >"$DIR/providers.yaml"
  export LLMQ_CONFIG="$DIR/providers.yaml"
  SAMPLES=examples/tasks.sample.json
fi

step "Two workers on queue '$QUEUE', and the scheduler"
# A fresh demo queue each run, so the figures below are this run's.
redis-cli -u "$REDIS_URL" --scan --pattern "llmq:{$QUEUE}:*" 2>/dev/null | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
for n in 1 2; do
  "$BIN/llmq-worker" --queue "$QUEUE" --concurrency 8 --retry-base 300ms >"$DIR/worker-$n.log" 2>&1 &
  PIDS+=($!)
done
echo "logs in $DIR/worker-1.log and $DIR/worker-2.log"
"$BIN/llmq-scheduler" >"$DIR/scheduler.log" 2>&1 &
PIDS+=($!)
echo "scheduler log in $DIR/scheduler.log"

step "A batch of sample tasks ($SAMPLES)"
"$BIN/llmq" batch --input "$SAMPLES" --queue "$QUEUE" --wait --output "$DIR/results.json" || true
echo "full results: $DIR/results.json"

step "A chain: plan -> plan review by another model -> implement -> code review -> a person approves -> release note"
CHAIN=$("$BIN/llmq" chain submit examples/chains/cross-review.json --queue "$QUEUE" \
  --var input="Move the billing service to Postgres 16")
echo "chain $CHAIN submitted; waiting for its approval step"
for _ in $(seq 1 300); do
  "$BIN/llmq" chain pending --queue "$QUEUE" | grep -q "$CHAIN" && break
  sleep 0.1
done
"$BIN/llmq" chain pending --queue "$QUEUE"
"$BIN/llmq" chain approve "$CHAIN" ship --queue "$QUEUE" --note "Approved by the demo script"
for _ in $(seq 1 300); do
  "$BIN/llmq" chain show "$CHAIN" --queue "$QUEUE" | grep -q "^State:    running" || break
  sleep 0.1
done
"$BIN/llmq" chain show "$CHAIN" --queue "$QUEUE"

step "Dead letters (replay with: llmq dlq replay <id> --queue $QUEUE)"
"$BIN/llmq" dlq list --queue "$QUEUE"

step "Status"
"$BIN/llmq" status --queue "$QUEUE"

step "Costs today, by model"
"$BIN/llmq" costs --date "$(date -u +%F)" --by model
step "Costs of the chain"
"$BIN/llmq" costs --chain-id "$CHAIN" --by type

step "The operator page"
echo "the same, in a browser: REDIS_URL=$REDIS_URL DATABASE_URL=$DATABASE_URL $BIN/llmq web"
echo "then open http://127.0.0.1:8080 (set LLMQ_WEB_TOKEN to approve, replay and pause from it)"
