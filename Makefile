# The two set-up commands of the README: `make serve` and `make test`.
.PHONY: serve test lint bootstrap

bootstrap:
	./scripts/bootstrap.sh

serve: bootstrap
	.venv/bin/python -m app.embedded

test: bootstrap
	./scripts/test.sh

lint: bootstrap
	.venv/bin/ruff check cnc_core app worker tests bench
	.venv/bin/ruff format --check cnc_core app worker tests bench migrations
	.venv/bin/mypy cnc_core app worker
