# make demo: set up and run the offline demo.   make test: set up and run the test suite.
.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q -m "not family" -n 2 --dist loadfile --no-loadscope-reorder

lint:
	.venv/bin/ruff check sftkit tests
