# shm_taskwork build plumbing. `make help` lists the targets.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
SPIN   ?= spin

NATIVE_DEPS = $(wildcard native/*.c native/*.h) native/build_ffi.py
ASAN_CFLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -g -O1
# --force: always recompile, so an ASan build never lingers and header-only
# changes are picked up (the core compiles in a few seconds).
# The old .so files go first: cffi builds `_taskwork_cffi.abi3.so`, and a
# stray `_taskwork_cffi.cpython-3XX-*.so` (from running native/build_ffi.py by
# hand) would take precedence over it at import.
BUILD_EXT   = rm -f shm_taskwork/_taskwork_cffi*.so && $(PY) setup.py build_ext --inplace --force -q

.DEFAULT_GOAL := help

.PHONY: help venv build test typecheck test-asan test-slow stress demo docs model-check clean bench-native

help:
	@echo "make venv         create $(VENV) and install the package (editable) with dev extras"
	@echo "make build        rebuild the cffi extension in place"
	@echo "make test         run the default test suite (not slow) and the type check"
	@echo "make typecheck    mypy --strict on examples/typed_usage.py (every public call)"
	@echo "make test-asan    run the asan-marked tests against an ASan/UBSan build"
	@echo "make test-slow    run the slow (stress) tests"
	@echo "make stress       60 s stress run with producer kills"
	@echo "make demo         run the demo"
	@echo "make docs         build the documentation into site/ (warnings are errors)"
	@echo "make model-check  check the Promela model with spin (needs spin installed)"
	@echo "make bench-native the native core (push + detach) against bare cmpxchg"
	@echo "make clean        remove build artifacts"

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml setup.py
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed; if ensurepip is missing, install it:" >&2; \
	  echo "       apt-get install python3-venv" >&2; \
	  exit 1; }
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev,remote]'
	@touch $@

build: venv
	$(BUILD_EXT)

# mypy as a user's strictly typed program sees the package (installed
# packages are followed silently): nothing may be reported.
test: venv build typecheck
	$(PY) -m pytest -q -m "not slow" tests

typecheck: venv
	$(PY) -m mypy --strict --follow-imports=silent --no-incremental examples/typed_usage.py

test-asan: venv
	export SHM_TASKWORK_CFLAGS="$(ASAN_CFLAGS)" && $(BUILD_EXT)
	@status=0; \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(PY) -m pytest -q -m asan tests || status=$$?; \
	echo "rebuilding the normal extension"; \
	$(BUILD_EXT) || { [ $$status -ne 0 ] || status=1; }; \
	exit $$status

test-slow: venv build
	$(PY) -m pytest -q -m slow tests
	$(PY) -m shm_taskwork.cli stress --track --tasks 4 --producers 4 --seconds 60 --kill-every 0.05 --restart --term

stress: venv build
	$(PY) -m shm_taskwork.cli stress --tasks 4 --producers 4 --seconds 60 --kill-every 0.05

demo: venv build
	$(PY) -m shm_taskwork.cli demo

# The same list as the `docs` extra of pyproject.toml, installed here without
# reinstalling the package itself.
DOCS_DEPS = 'mkdocs>=1.6' 'mkdocstrings[python]>=0.26' 'pymdown-extensions>=10'

$(VENV)/.docs-stamp: $(VENV)/.stamp Makefile
	$(PY) -m pip install -q $(DOCS_DEPS)
	@touch $@

docs: venv $(VENV)/.docs-stamp
	$(PY) -m mkdocs build --strict -q
	@echo "documentation built in site/"

# Part 1: push / detach / cancel-under-lock; part 2 (-DFREELIST): the tagged
# free list. Part 3 removes the tag and must FAIL: the checker can see ABA.
# nodecache.pml: the per-process node cache's batch pop and push beside single
# pops, pushes and steals, with a death anywhere; without the tag, or with an
# intent that names one node of a batch, it must FAIL.
model-check:
	@command -v $(SPIN) >/dev/null 2>&1 || { \
	  echo "error: spin is not installed (e.g. apt-get install spin)" >&2; exit 1; }
	cd model && $(SPIN) -a taskwork.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 | tee pan.out \
	  && grep -q "errors: 0" pan.out
	cd model && $(SPIN) -a -DFREELIST taskwork.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 | tee pan.out \
	  && grep -q "errors: 0" pan.out
	cd model && $(SPIN) -a -DFREELIST -DNOTAG taskwork.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 > pan.out; \
	  grep -q "assertion violated" pan.out && echo "without the tag spin finds the ABA, as it should"
	cd model && $(SPIN) -a nodecache.pml && gcc -O2 -w -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 | tee pan.out \
	  && grep -q "errors: 0" pan.out
	cd model && $(SPIN) -a -DNOTAG nodecache.pml && gcc -O2 -w -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 > pan.out; \
	  grep -q "assertion violated" pan.out && echo "without the tag spin finds the batch pop's ABA, as it should"
	cd model && $(SPIN) -a -DSHORTINTENT nodecache.pml && gcc -O2 -w -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 > pan.out; \
	  grep -q "assertion violated" pan.out && echo "with an intent naming one node of a batch spin finds a batch node fsck would take for a leak, as it should"
	cd model && $(SPIN) -a -DMAXCANCEL=0 signal.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 | tee pan.out \
	  && grep -q "errors: 0" pan.out
	cd model && $(SPIN) -a -DMAXDEATH=0 -DMAXFAIL=0 signal.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 | tee pan.out \
	  && grep -q "errors: 0" pan.out
	cd model && $(SPIN) -a -DNA=3 -DNPER=1 -DMAXDEATH=0 -DMAXCANCEL=0 -DMAXFAIL=0 signal.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 | tee pan.out \
	  && grep -q "errors: 0" pan.out
	cd model && $(SPIN) -a -DNOWATCH -DMAXFAIL=0 -DMAXDEATH=0 -DMAXCANCEL=0 signal.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 > pan.out; \
	  grep -q "invalid end state" pan.out && echo "without the watcher spin finds the deferred handler's stranded works, as it should"
	cd model && $(SPIN) -a -DSPLITSEQ -DMAXCANCEL=0 signal.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 > pan.out; \
	  grep -q "invalid end state" pan.out && echo "with the signal counted after the flag's arming spin finds the works stranded behind an adder that died between the two, as it should"
	cd model && $(SPIN) -a -DACKLOG -DMAXDEATH=0 -DMAXCANCEL=0 signal.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 > pan.out; \
	  grep -q "invalid end state" pan.out && echo "with a failed handler's ack standing spin finds the stranded works, as it should"
	cd model && $(SPIN) -a -DOLDEXIT -DMAXDEATH=0 -DMAXFAIL=0 signal.pml && gcc -O2 -DSAFETY -DCOLLAPSE -o pan pan.c && ./pan -m200000 > pan.out; \
	  grep -q "invalid end state" pan.out && echo "with a run that returns after one clear spin finds the works stranded behind a cancelled work's armed flag, as it should"
	cd model && $(SPIN) -a outcome.pml && gcc -O2 -DSAFETY -o pan pan.c && ./pan -m200000 | tee pan.out \
	  && grep -q "errors: 0" pan.out
	cd model && $(SPIN) -a -DNOWAKEBIT outcome.pml && gcc -O2 -DSAFETY -o pan pan.c && ./pan -m200000 > pan.out; \
	  grep -q "invalid end state" pan.out && echo "without the waiter's bit spin finds the lost wake-up, as it should"
	rm -f model/pan* model/*.trail model/_spin_nvr.tmp

clean:
	rm -rf build *.egg-info .pytest_cache site
	rm -f shm_taskwork/_taskwork_cffi* native/*.o *.o
	rm -f model/pan model/pan.* model/_spin_nvr.tmp model/*.trail

# The lock-free core alone against the bare atomics it is built from.
bench-native:
	gcc -O2 -std=gnu11 -o native/bench/bench_native native/bench/bench_native.c \
	  $(wildcard native/*.c) -lpthread
	./native/bench/bench_native
	rm -f native/bench/bench_native
