# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-tansu test-apache test-slow lint install native kafka clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,native]'
	touch $(STAMP)

install: $(STAMP) native

# The optional compiled ingest rules (streams/native): mypyc (the `native` extra) when a C
# compiler is here, else one line and pure Python. A no-op while the rules' sources are
# unchanged; the loader runs a build only when it matches them (NATIVE_ARGS=--strict: fail
# instead of falling back, as CI does).
native: $(STAMP)
	@$(BIN)/python -m streams.native build $(NATIVE_ARGS)

demo: $(STAMP) native
	$(BIN)/liftstream demo $(ARGS)

# The broker-dependent tests run against Apache Kafka (deploy/kafka/run-kafka.sh)
# when java and mvn are on PATH, else against the embedded Tansu broker;
# LIFTSTREAM_TEST_BROKER=tansu|apache|HOST:PORT chooses (tests/conftest.py).
test: $(STAMP) native
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-tansu: $(STAMP) native
	LIFTSTREAM_TEST_BROKER=tansu $(BIN)/python -m pytest $(PYTEST_ARGS)

test-apache: $(STAMP) native
	LIFTSTREAM_TEST_BROKER=apache $(BIN)/python -m pytest $(PYTEST_ARGS)

# A local Apache Kafka on 127.0.0.1:9092 until Ctrl-C (ARGS="--port N" etc.).
kafka:
	deploy/kafka/run-kafka.sh $(ARGS)

test-slow: $(STAMP) native
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# ruff, then the import contracts of pyproject.toml's [tool.importlinter] (the layering).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
