.PHONY: setup run dev serve test test-fast lint bench bench-scale bench-load bench-faults

setup:
	./scripts/setup.sh

# Serve on the embedded default (SQLite + default model under ./data).
run: setup
	.venv/bin/uvicorn main:app --host 127.0.0.1 --port 8000

dev: setup
	.venv/bin/uvicorn main:app --host 127.0.0.1 --port 8000 --reload --reload-dir app --reload-dir colbert_patches

# Production: WEB_CONCURRENCY workers, graceful shutdown, settings from
# COLBERT_SERVER_* or .env (scripts/serve.sh; the Docker image's entry point).
serve: setup
	./scripts/serve.sh

test: setup
	./scripts/setup-browser.sh
	.venv/bin/python -m pytest -q -rs --durations=15

# The tests that load no model and build no PLAID index (seconds, not minutes).
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

lint: setup
	.venv/bin/ruff check app colbert_patches models tests bench
	.venv/bin/ruff format --check app colbert_patches models tests bench
	.venv/bin/mypy app colbert_patches models

# Retrieval quality on msmarco-mini and business-reports in one run (every
# signal, hybrid combination and the default; bench/quality.py), then
# msmarco-mini's throughput, latency and memory (bench/msmarco_mini.py).
bench: setup
	.venv/bin/python -m bench.quality
	.venv/bin/python -m bench.msmarco_mini

# Scale on one node (bench/scale.py): a stand-in-encoder run to 1M passages and
# a real-encoder run to 100k (hours on 2 cores). Smaller sizes and parts, e.g.
#   make bench-scale BENCH_SCALE_ARGS="--engine-passages 20000 --skip-real"
bench-scale: setup
	.venv/bin/python -m bench.scale $(BENCH_SCALE_ARGS)

# Load (bench/load.py): 16 search clients and a writer upserting continuously
# against 2 workers for 10 minutes, default checkpoint. Shorter or on the
# stand-in encoder, e.g.
#   make bench-load BENCH_LOAD_ARGS="--duration 60 --preload 1000"
bench-load: setup
	.venv/bin/python -m bench.load $(BENCH_LOAD_ARGS)

# Fault injection (bench/faults.py): 120 kill -9 runs (plain upserts, the first
# PLAID build, merges and retrainings) and a disk-full run (a tmpfs as root,
# else prlimit --fsize), through real server processes with the stand-in
# encoder; every acknowledged write must survive. Fewer runs, e.g.
#   make bench-faults BENCH_FAULTS_ARGS="--runs 12 --skip-disk-full"
bench-faults: setup
	.venv/bin/python -m bench.faults $(BENCH_FAULTS_ARGS)
