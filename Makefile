# One command each on a fresh machine: `make demo`, `make test`.
# CPU by default: `torch==2.13.0` resolves to the CPU wheel on the lab image. On a CUDA machine, install the
# CUDA build first (`make venv TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url <your CUDA wheel index>"`).
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test protos bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) deploy/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# The one command that regenerates the committed gRPC/protobuf stubs.
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos protos/tsotsa/v1/tsotsa.proto

bench: $(STAMP)
	$(PY) bench/inference.py
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) .pytest_cache
