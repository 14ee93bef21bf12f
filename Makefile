# make demo: set up and run the offline demo.   make test: set up and run the test suite, both tiers.
# make test-fast: the fast tier alone (tests/*.py: in process, no sftkit process or launcher started).
.PHONY: setup demo test test-fast lint

# 2 workers on 2 cores, each process one intra-op thread (a launcher sets the same for its ranks): with
# torch's default of one thread a core, the workers' processes oversubscribe the cores (25 CPU-min
# for the suite instead of 18)
PYTEST = OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m "not family" -n 2 --dist worksteal

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) tests --ignore=tests/process

lint:
	.venv/bin/ruff check sftkit tests
