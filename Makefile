# llmq: `make help` lists the targets.

SHELL := /bin/bash
CARGO ?= cargo
export REDIS_URL ?= redis://127.0.0.1:6379
export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/llmq
# The commit every binary names in `llmq_build_info` (none outside a git checkout).
export LLMQ_COMMIT ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null)

.PHONY: help demo test bench bench-compare bench-bullmq bullmq-deps lint fmt build services examples-deps clients-deps browser-deps sdk-deps promtool-deps deploy-check image image-check

help: ## Show the targets and what they do
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

demo: ## Start or reuse Redis and Postgres, migrate, run llmq-mock and two workers, enqueue samples and a chain, print results and costs
	@deploy/demo.sh

test: services examples-deps clients-deps browser-deps sdk-deps promtool-deps build ## Run every test against the local Redis and Postgres
	$(CARGO) test --workspace

bench: services bullmq-deps ## Run the benchmarks (figures in docs/benchmarks.md; queue_noop runs BullMQ's no-op beside it)
	$(CARGO) build --release --bin llmq
	$(CARGO) run --release -p llmq-tests --bin llmq-bench

bench-compare: services ## Compare the core benchmarks of REF=<commit> with this tree: alternating runs (RUNS=3), each figure's medians and ratio
	@REF="$(REF)" python3 tests/bench/compare.py

bench-bullmq: services bullmq-deps ## BullMQ's side of the comparison, on the same Redis (needs Node and npm)
	cd tests/bullmq && node bench.mjs noop && node bench.mjs inflight

bullmq-deps: ## Install the BullMQ that the benchmarks compare with (tests/bullmq, exact versions; needs Node and npm)
	@[ -d tests/bullmq/node_modules/bullmq ] || (cd tests/bullmq && npm install --no-audit --no-fund --ignore-scripts --loglevel=error)

lint: ## cargo fmt --check, clippy with warnings as errors, and no import cycle between a crate's top modules
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# tests/tests/layout.rs reads each crate's src/ for crate:: and super:: paths between its
	# top modules (comments, strings and test modules left out) and fails naming any cycle.
	$(CARGO) test -p llmq-tests --test layout

fmt: ## Format the code
	$(CARGO) fmt --all

build: ## Build every binary (the suites start llmq-worker as a process)
	$(CARGO) build --workspace --bins

services: ## Make sure Redis and Postgres answer (starting them if needed)
	@deploy/services.sh

examples-deps: ## Install what the Python and Node producer examples need
	@python3 -c 'import redis' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
	@[ -d examples/node/node_modules/redis ] || (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)

clients-deps: ## Install the Python client and its pinned test tools in a venv, and build the Node client (producer/clients)
	@producer/clients/python/deps.sh
	@producer/clients/node/deps.sh

browser-deps: ## Install what the browser test needs: Debian's chromium, and Playwright (pinned) in a venv
	@tests/browser/deps.sh

promtool-deps: ## Install Prometheus's promtool (Debian's prometheus, pinned), which the metrics test runs
	@deploy/monitoring/deps.sh

sdk-deps: ## Install OpenAI's and Anthropic's Python SDKs (pinned) in a venv, to check llmq's answers to their batch files
	@tests/sdk/deps.sh

deploy-check: promtool-deps ## Check the Dockerfile and the Kubernetes manifests offline (kustomize, schemas, lints, deploy/tests)
	@deploy/check.sh

image: ## Build the image from ./Dockerfile with buildah (no daemon, no registry: bases made from Debian's packages; deploy/image.sh) and print its size
	@deploy/image.sh

image-check: services ## Run the built image: each binary's --version as its user, and a worker from it finishing a task against the local Redis, Postgres and llmq-mock
	@$(CARGO) build --quiet -p llmq-tests --bin llmq-mock
	@deploy/image-check.sh
