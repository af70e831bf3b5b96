# Order-processing saga: build, run on 127.0.0.1 and test. `make help` lists the targets.
# Everything runs locally (DynamoDB Local and moto on 127.0.0.1); nothing calls AWS.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

CARGO ?= cargo
SETUP := infra/scripts/setup.sh
# The venv's tools (moto_server, cargo-lambda, cfn-lint, sam, and the python3 whose
# ziglang cargo-lambda links with) come first.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export SAM_CLI_TELEMETRY := 0
# Extra arguments for `make run`, e.g. make run ARGS='--help'.
ARGS ?=
# `make test KEEP_SERVICES=1` leaves DynamoDB Local and moto running afterwards.
KEEP_SERVICES ?=

.PHONY: help setup setup-tools build run token test lint fmt stop clean redrive audit opening-balances bench sam-invoke

help: ## List the targets
	@echo "usage: make TARGET"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-12s %s\n", $$1, $$2 }'

setup: ## Install Java 17+, moto (.venv) and DynamoDB Local (infra/node_modules)
	$(SETUP) stack

setup-tools: ## setup, plus cargo-lambda, zig, cfn-lint, sam and the arm64 Rust target
	$(SETUP) all

build: setup-tools ## sam build (an arm64 bootstrap per function in .aws-sam/build), and the host release binaries
	sam build
	$(CARGO) build --release -p order-api -p stock -p payment -p coordinator -p sweeper

run: setup ## Run the whole saga on 127.0.0.1:3000 (starts or reuses the local services)
	$(CARGO) run -p local-runner --bin saga-local -- run $(ARGS)

# `make token USER_NAME=bob OPERATOR=1`: an access token of a user of the local pool.
USER_NAME ?= alice
OPERATOR ?=
# Only the token goes to stdout (export TOKEN=$$(make -s token)); set-up reports go to stderr.
token: ## Print an access token of a local user: make token [USER_NAME=bob] [OPERATOR=1]
	@$(SETUP) stack >&2
	@$(CARGO) run -q -p local-runner --bin saga-local -- token --user $(USER_NAME) $(if $(OPERATOR),--operator)

QUEUE ?=
redrive: ## Move messages from a DLQ back to its queue: make redrive QUEUE=StockDeadLetterQueue
	@if [ -z "$(QUEUE)" ]; then echo "usage: make redrive QUEUE=StockDeadLetterQueue (or PaymentDeadLetterQueue, CoordinatorDeadLetterQueue)"; exit 2; fi
	$(CARGO) run -q -p local-runner --bin saga-local -- redrive --queue $(QUEUE) $(ARGS)

audit: ## Check the stores' invariants (the local stack of make run; ARGS='--help' for a deployed one)
	$(CARGO) run -q -p local-runner --bin saga-local -- audit $(ARGS)

opening-balances: ## First stock movements of products from before movements (ARGS='--apply' writes them)
	$(CARGO) run -q -p local-runner --bin saga-local -- opening-balances $(ARGS)

FN ?=
EVENT ?=
sam-invoke: setup-tools ## One function on one event with sam local invoke: make sam-invoke FN=StockFunction EVENT=events/sqs-stock-reserve.json
	@if [ -z "$(FN)" ] || [ -z "$(EVENT)" ]; then echo "usage: make sam-invoke FN=StockFunction EVENT=events/sqs-stock-reserve.json (FN: a function of template.yaml; EVENT: a file of events/)"; exit 2; fi
	infra/scripts/sam-local.sh invoke $(FN) $(EVENT)

bench: setup-tools ## Benchmark report (target/bench/report.md): the stock function beside Node.js and Python peers, cold starts, sizes, calls, the whole saga under open-loop load, AWS projection; fails on a missed budget
	infra/scripts/bench.sh

fmt: ## Format the Rust code
	$(CARGO) fmt --all

lint: setup-tools ## rustfmt check, clippy -D warnings, cfn-lint and sam validate on template.yaml
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@if [ -f template.yaml ]; then \
		echo "cfn-lint template.yaml" && cfn-lint template.yaml && \
		echo "sam validate --lint" && sam validate --lint --region us-east-1 --template-file template.yaml; \
	fi

# The tests build target/debug/saga-local with the whole workspace's features; `cargo run -p
# local-runner` would rebuild the SDK crates with its own (minutes), so the test run stops the
# services with the binary it built.
test: setup-tools lint ## Lint, then the whole test suite; stops the services afterwards
	status=0; $(CARGO) test --workspace --no-fail-fast || status=$$?; \
	if [ -z "$(KEEP_SERVICES)" ]; then \
	  runner="$${CARGO_TARGET_DIR:-target}/debug/saga-local"; \
	  if [ -x "$$runner" ]; then "$$runner" stop || true; else $(MAKE) --no-print-directory stop || true; fi; \
	fi; \
	exit $$status

stop: ## Stop the local services recorded in .local/pids (and sam-invoke's dockerd and relay)
	$(CARGO) run -q -p local-runner --bin saga-local -- stop

clean: ## Stop the services; remove .local (logs, pids, data) and the outputs of cargo lambda and sam
	$(MAKE) --no-print-directory stop || true
	rm -rf .local target/lambda .aws-sam
