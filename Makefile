# pyxl -- the two commands a newcomer types are `make test` and `make demo`.
VENV      := .venv
PY        := $(VENV)/bin/python
# Xen's tools of this Debian release: 4.17 on Debian 12, 4.20 on Debian 13.
XEN_REL   := $(shell . /etc/os-release 2>/dev/null; [ "$${VERSION_ID%%.*}" = 13 ] && echo 4.20 || echo 4.17)
APT_PKGS  := libxen-dev xen-utils-$(XEN_REL) valgrind groff-base zstd
STAMP     := $(VENV)/.pyxl-installed
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SOURCES   := setup.py pyproject.toml pyxl/wire/table.py pyxl/wire/_generated.py \
             $(wildcard libxl_helper/*.c libxl_helper/*.pyx libxl_helper/*.pxd libxl_helper/*.pxi \
                        libxl_helper/*.py fakexen/*.c fakexen/*.h spawner/*.c finisher/*.c)
PYTEST_ARGS ?=

.PHONY: setup test test-slow lint regen demo bench memcheck clean apt xen-e2e test-debian13 man

setup: $(STAMP)

# Debian packages: only the missing ones, and without recommends (xen-utils
# would otherwise pull in the hypervisor, grub-xen-host and qemu-system-xen).
apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): $(SOURCES) | apt
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $@

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (pyproject.toml [tool.ruff]); `make test` runs it before pytest.
lint: setup
	$(PY) -m ruff check pyxl tests bench libxl_helper/genmsgs.py

# Rewrite the committed pyxl/wire/_generated.py from the message table, pyxl/wire/table.py.
# The build refuses a stale copy ("stale pyxl/wire/_generated.py: run make regen").
regen:
	python3 libxl_helper/genmsgs.py regen

test-slow: setup
	PYXL_SLOW=1 $(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/pyxl demo

# The man page, generated from the CLI's parser (as `pyxl completion bash` is): build/pyxl.1.
man: setup
	@mkdir -p build
	$(PY) -m pyxl.cli.docgen man > build/pyxl.1
	@echo "build/pyxl.1 (man -l build/pyxl.1)"

# Full run < 10 min on 2 cores, QUICK=1 < 3 min: bench/results/latest.{json,md,png}.
bench: setup
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q matplotlib
	$(PY) bench/run.py $(if $(QUICK),--quick)
	$(PY) bench/stall.py $(if $(QUICK),--quick --out bench/results/quick.json)
	$(PY) bench/compress.py $(if $(QUICK),--quick --out bench/results/quick.json)
	$(PY) bench/report.py bench/results/$(if $(QUICK),quick,latest).json > /dev/null

# valgrind memcheck of our helper: save, live save, restore on fakexen (bench/memcheck.py),
# then the helper's failure paths (tests/integration/test_helper_memcheck.py).  `make test` runs both too.
memcheck: setup
	$(PY) bench/memcheck.py
	$(PY) -m pytest -q tests/integration/test_helper_memcheck.py

clean:
	rm -rf build $(VENV) pyxl/pyxl-save-helper pyxl/pyxl-sim-vcpu pyxl/pyxl-spawner pyxl/pyxl-finisher pyxl/libfakexen.so *.egg-info

# The same suite against Xen 4.20's libraries and Python 3.13: `make test` inside a
# Debian 13 root built from Debian's packages (cached in .cache/debian13). Root, ~2 min
# to build the root, then the suite's own time.
test-debian13:
	bash debian13/suite.sh

# Real Xen 4.17 booted in QEMU (TCG): Debian's xl/libxl drives our helper and Debian's,
# save/restore/live migrate, timed side by side (xen-e2e/README.md). Root, ~7 min cold.
xen-e2e:
	bash xen-e2e/run.sh
