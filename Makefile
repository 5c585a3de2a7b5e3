# amp2dify — build, test, run.
#
#   make                         build/amp2dify
#   make test                    unit + end-to-end tests, then again under ASan+UBSan
#   make SANITIZER=address,undefined [test-run]   sanitizer build in build/san-address-undefined/
#   make run                     serve examples/amp2dify.json
#   make deps                    apt-get install the missing Debian packages
#   make bench                   ingest and delivery benchmarks (see bench/)

comma := ,
PKGS := libmicrohttpd openssl jansson libcurl sqlite3 hiredis libarchive zlib
DEB_PKGS := libmicrohttpd-dev libssl-dev libjansson-dev libcurl4-openssl-dev libsqlite3-dev \
            libhiredis-dev libarchive-dev zlib1g-dev libjemalloc-dev check pkg-config
# What `make test` runs beside the build: servers and tools of the end-to-end
# tests (the SDK test's Node.js and npm come from .ci/run or the machine).
TEST_DEB_PKGS := redis-server nginx-light curl sqlite3 prometheus python3 systemd procps

SANITIZER ?=
ifeq ($(SANITIZER),)
BUILD := build
SANFLAGS :=
# jemalloc replaces libc's malloc in the daemon's plain build: the JSON
# trees of its HTTP and delivery threads are many small blocks, often freed
# by another thread than the one that allocated them. Measured against
# libc's malloc (2 CPUs, alternating runs): CPU per event -13% on the HTTP
# threads and per delivery -13% on the workers, an export +41% events/s;
# peak RSS of a 1M-row backlog 24 MiB against 20. Tests, fakes and
# benchmark tools keep libc's malloc (so the benchmarks' references stay
# as they were), and so do sanitizer builds, whose runtimes replace it.
ALLOC_PKGS := jemalloc
else
BUILD := build/san-$(subst $(comma),-,$(SANITIZER))
SANFLAGS := -fsanitize=$(SANITIZER) -fno-omit-frame-pointer -fno-sanitize-recover=all
endif

CC ?= cc
OPT ?= -O2 -g
WARN := -Wall -Wextra -Werror -Wshadow -Wformat=2 -Wstrict-prototypes
CFLAGS_ALL = -std=c11 -D_GNU_SOURCE $(OPT) $(WARN) $(SANFLAGS) -MMD -MP \
             $(shell pkg-config --cflags $(PKGS)) $(CFLAGS)
LDLIBS_ALL = $(shell pkg-config --libs $(PKGS)) -lpthread -lm $(LDLIBS)
ALLOC_LIBS = $(if $(ALLOC_PKGS),$(shell pkg-config --libs $(ALLOC_PKGS)))
CHECK_CFLAGS = $(shell pkg-config --cflags check)
CHECK_LIBS = $(shell pkg-config --libs check)

MODULES := base json crypto mapping queue spool redisq sources forward config handlers cmd
LIB_SRCS := $(filter-out cmd/main.c,$(foreach m,$(MODULES),$(wildcard $(m)/*.c)))
LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
LIB := $(BUILD)/libamp.a
BIN := $(BUILD)/amp2dify

UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/unit/%)
E2E_SRCS := $(wildcard tests/e2e/test_*.c)
E2E_BINS := $(E2E_SRCS:tests/e2e/%.c=$(BUILD)/tests/e2e/%)
# Shared by end-to-end tests: the harness and the fake Dify (not its main).
E2E_SUPPORT := $(filter-out tests/e2e/test_%.c,$(wildcard tests/e2e/*.c)) \
               $(filter-out tests/fake_dify/main.c,$(wildcard tests/fake_dify/*.c)) \
               $(filter-out tests/fake_amplitude/main.c,$(wildcard tests/fake_amplitude/*.c))
E2E_SUPPORT_OBJS := $(E2E_SUPPORT:%.c=$(BUILD)/obj/%.o)
FAKE_DIFY := $(BUILD)/fake-dify
FAKE_AMPLITUDE := $(BUILD)/fake-amplitude
BENCH_SRCS := $(wildcard bench/*.c)
BENCH_BINS := $(BENCH_SRCS:bench/%.c=$(BUILD)/bench/%)

.PHONY: all test test-run unit e2e layers run deps clean bench format format-check
# Keep test objects between runs (they are intermediate files to make).
.SECONDARY:

all: $(BIN)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c -o $@ $<

$(BUILD)/obj/tests/%.o: tests/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(CHECK_CFLAGS) -c -o $@ $<

$(LIB): $(LIB_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@
	ar rcs $@ $^

$(BIN): $(BUILD)/obj/cmd/main.o $(LIB)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(ALLOC_LIBS) $(LDLIBS_ALL)

$(BUILD)/tests/unit/%: $(BUILD)/obj/tests/unit/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS_ALL)

# The forward engine's tests talk to the same fake Dify as the end-to-end ones.
FAKE_DIFY_OBJS := $(BUILD)/obj/tests/fake_dify/fake_dify.o
$(BUILD)/tests/unit/test_forward: $(BUILD)/obj/tests/unit/test_forward.o $(FAKE_DIFY_OBJS) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS_ALL)

# The Amplitude sink's tests talk to the fake Amplitude.
$(BUILD)/tests/unit/test_amplitude: $(BUILD)/obj/tests/unit/test_amplitude.o \
                                    $(BUILD)/obj/tests/fake_amplitude/fake_amplitude.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS_ALL)

# The Redis engine's tests start their own redis-server (tests/e2e/redis_server.c).
REDIS_TEST_OBJS := $(BUILD)/obj/tests/e2e/redis_server.o $(BUILD)/obj/tests/e2e/harness.o
$(BUILD)/tests/unit/test_redisq: $(BUILD)/obj/tests/unit/test_redisq.o $(REDIS_TEST_OBJS) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS_ALL)

$(BUILD)/tests/e2e/%: $(BUILD)/obj/tests/e2e/%.o $(E2E_SUPPORT_OBJS) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS_ALL)

# A test tool test_io_errors preloads into amp2dify (tests/faults/fail_io.c):
# never sanitized, since it is loaded before the sanitizer runtimes. Order-only,
# so it is built first but not linked into the test.
FAIL_IO := $(BUILD)/tests/libfail_io.so
$(FAIL_IO): tests/faults/fail_io.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE $(OPT) $(WARN) -shared -fPIC -o $@ $< -ldl
$(BUILD)/tests/e2e/test_io_errors: | $(FAIL_IO)

$(FAKE_DIFY): $(BUILD)/obj/tests/fake_dify/main.o $(E2E_SUPPORT_OBJS) $(LIB)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS_ALL)

$(FAKE_AMPLITUDE): $(BUILD)/obj/tests/fake_amplitude/main.o \
                   $(BUILD)/obj/tests/fake_amplitude/fake_amplitude.o $(LIB)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(LDLIBS_ALL)

$(BUILD)/bench/%: $(BUILD)/obj/bench/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(LDLIBS_ALL)

# The Export benchmark's helper serves zips with the tests' fake Amplitude.
$(BUILD)/bench/export_fake: $(BUILD)/obj/bench/export_fake.o \
                            $(BUILD)/obj/tests/fake_amplitude/fake_amplitude.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(LDLIBS_ALL)

# The Amplitude sink's benchmark sends to the tests' fake Amplitude.
$(BUILD)/bench/sink_bench: $(BUILD)/obj/bench/sink_bench.o \
                           $(BUILD)/obj/tests/fake_amplitude/fake_amplitude.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(LDLIBS_ALL)

unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

e2e: $(BIN) $(FAKE_DIFY) $(FAKE_AMPLITUDE) $(E2E_BINS)
	@set -e; for t in $(E2E_BINS); do echo "== $$t"; AMP2DIFY_BIN=$(BIN) $$t; done
	bash tests/mapping/run.sh $(BIN)
	bash tests/config/run.sh $(BIN)
	bash tests/nginx/run.sh $(BUILD)
	bash tests/metrics/run.sh $(BUILD)
	bash tests/signals/run.sh $(BUILD)
	bash tests/docker/run.sh $(BUILD)
	bash tests/systemd/run.sh $(BUILD)
	bash tests/sdk/run.sh $(BUILD)

# Includes only down the layers of tests/layers/edges; symbols with their
# folder's prefix (tests/layers/prefixes).
layers: $(LIB)
	bash tests/layers/check.sh $(BUILD)/obj

test-run: layers unit e2e

# The plain build first (fast feedback), then the same suite under
# AddressSanitizer + UndefinedBehaviorSanitizer. Each build's binaries are
# made with every CPU first (test-bins); the tests themselves run one at a
# time.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
test:
	$(MAKE) -j$(JOBS) test-bins
	$(MAKE) test-run
	$(MAKE) -j$(JOBS) SANITIZER=address,undefined test-bins
	$(MAKE) SANITIZER=address,undefined test-run

run: $(BIN)
	$(BIN) serve -c examples/amp2dify.json

# BENCH_BASE=DIR (an older build directory with its bench binaries): the
# ingest and spool benchmarks also run that build and report this one's
# figures as ratios to it, measured in the same run.
BENCH_BASE ?=
bench: $(BIN) $(FAKE_DIFY) $(BENCH_BINS)
	bash bench/run.sh $(BUILD) $(BENCH_BASE)
	bash bench/delivery.sh $(BUILD)
	bash bench/backlog.sh $(BUILD)
	bash bench/spool.sh $(BUILD) $(BENCH_BASE)
	bash bench/redis.sh $(BUILD)
	bash bench/export.sh $(BUILD)
	bash bench/sink.sh $(BUILD)

deps:
	@missing=""; for p in $(DEB_PKGS) $(TEST_DEB_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	else echo "all dependencies present"; fi

FORMAT_SRCS = $(shell git ls-files '*.c' '*.h')
format:
	clang-format -i $(FORMAT_SRCS)
format-check:
	clang-format --dry-run --Werror $(FORMAT_SRCS)

clean:
	rm -rf build

-include $(shell find build -name '*.d' 2>/dev/null)

# ---- fuzzing (tests/fuzz) ----
# Fuzz targets are tests/fuzz/fuzz_<name>.c, their corpora tests/fuzz/corpus/<name>/.
#   make fuzz-replay             every corpus file once through its target, linked with
#                                tests/fuzz/replay.c and built with $(CC) (no clang needed)
#   make fuzz FUZZ_SECONDS=N     build each target with clang, libFuzzer, ASan and UBSan in
#                                build/fuzz-clang/ and run it N seconds (FUZZ_JOBS at once);
#                                new inputs and crashes stay under build/fuzz-clang/
#   make matrix                  the end-to-end bad-input matrix (tests/matrix/)
#   make limits                  connection, header, nesting, event-count and string limits,
#                                and 1000 idle connections not blocking a valid sender
# test-run (so `make test`, plain and under ASan+UBSan) includes fuzz-replay, matrix, limits.
FUZZ_SRCS := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_NAMES := $(FUZZ_SRCS:tests/fuzz/fuzz_%.c=%)
FUZZ_REPLAY_BINS := $(FUZZ_NAMES:%=$(BUILD)/fuzz/replay_%)
FUZZ_BINS := $(FUZZ_NAMES:%=$(BUILD)/fuzz/fuzz_%)
FUZZ_SECONDS ?= 60
FUZZ_JOBS ?= 1
FUZZ_CLANG ?= clang
FUZZ_BUILD := build/fuzz-clang
# Warnings stay on for the clang build but do not stop it: clang warns about
# things gcc accepts, and fuzzing should not wait on them.
FUZZ_WARN := -Wall -Wextra -Wshadow -Wformat=2 -Wstrict-prototypes

.PHONY: fuzz-replay fuzz fuzz-bins matrix limits

$(BUILD)/fuzz/replay_%: $(BUILD)/obj/tests/fuzz/fuzz_%.o $(BUILD)/obj/tests/fuzz/replay.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -o $@ $^ $(LDFLAGS) $(LDLIBS_ALL)

fuzz-replay: $(FUZZ_REPLAY_BINS)
	@set -e; for n in $(FUZZ_NAMES); do $(BUILD)/fuzz/replay_$$n tests/fuzz/corpus/$$n; done

# Built only by the clang sub-make of `fuzz`: libFuzzer supplies main().
$(BUILD)/fuzz/fuzz_%: $(BUILD)/obj/tests/fuzz/fuzz_%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) -fsanitize=fuzzer -o $@ $^ $(LDFLAGS) $(LDLIBS_ALL)

fuzz-bins: $(FUZZ_BINS)

fuzz:
	$(MAKE) CC=$(FUZZ_CLANG) BUILD=$(FUZZ_BUILD) SANITIZER=fuzzer-no-link,address,undefined \
	        WARN="$(FUZZ_WARN)" fuzz-bins
	bash tests/fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_JOBS) $(FUZZ_NAMES)

matrix: $(BIN) $(FAKE_DIFY)
	bash tests/matrix/run.sh $(BIN) $(FAKE_DIFY)

limits: $(BIN)
	bash tests/matrix/limits.sh $(BIN)

test-run: fuzz-replay matrix limits
# ---- end fuzzing ----

# Every binary test-run runs (here, after FUZZ_REPLAY_BINS is defined).
test-bins: $(LIB) $(BIN) $(FAKE_DIFY) $(FAKE_AMPLITUDE) $(UNIT_BINS) $(E2E_BINS) $(FUZZ_REPLAY_BINS)
.PHONY: test-bins

# ---- ThreadSanitizer and valgrind (issue 7) ----
#   make tsan        SANITIZER=thread build in build/san-thread/; the spool (group
#                    commit), forward (worker pool), Redis engine and signature (one
#                    verifier shared by threads) unit tests, forked and with CK_FORK=no,
#                    then the end-to-end tests in TSAN_E2E against the TSan-built
#                    server (the tests fail on a ThreadSanitizer report in its log or
#                    a non-zero exit)
#   make valgrind    the end-to-end suite with every amp2dify process under valgrind
#                    memcheck (tests/valgrind/run.sh; reports in build/valgrind/logs)
# Neither is part of `make test`.
TSAN_UNIT := test_spool test_forward test_redisq test_sig
TSAN_E2E ?= test_foundation test_delivery test_durability test_admin test_redis test_dify_2026 test_export \
            test_report
# The unit tests' timeouts guard against hangs; ThreadSanitizer runs code 5 to
# 15 times slower, and more on a busy machine, so they stretch under it.
TSAN_TIMEOUT_MULTIPLIER ?= 6
# GCC's TSan needs the address layout it was built for; kernels with more mmap
# randomisation (vm.mmap_rnd_bits > 28) break it, so ASLR is off for the run
# when setarch may turn it off (children, the server included, inherit that).
TSAN_RUN = $(shell setarch $$(uname -m) -R true 2>/dev/null && echo setarch $$(uname -m) -R)

.PHONY: tsan tsan-run valgrind valgrind-run

tsan:
	$(MAKE) SANITIZER=thread tsan-run

tsan-run: $(TSAN_UNIT:%=$(BUILD)/tests/unit/%) $(BIN) $(FAKE_DIFY) $(TSAN_E2E:%=$(BUILD)/tests/e2e/%)
	@set -e; export CK_TIMEOUT_MULTIPLIER=$(TSAN_TIMEOUT_MULTIPLIER) \
	  TSAN_OPTIONS="second_deadlock_stack=1 $$TSAN_OPTIONS"; \
	for t in $(TSAN_UNIT); do \
	  echo "== tsan $$t"; $(TSAN_RUN) $(BUILD)/tests/unit/$$t; \
	  echo "== tsan $$t (CK_FORK=no)"; CK_FORK=no $(TSAN_RUN) $(BUILD)/tests/unit/$$t; done; \
	for t in $(TSAN_E2E); do \
	  echo "== tsan $$t"; AMP2DIFY_BIN=$(BIN) $(TSAN_RUN) $(BUILD)/tests/e2e/$$t; done

# The plain build: valgrind cannot run sanitizer builds.
valgrind:
	$(MAKE) SANITIZER= valgrind-run

valgrind-run: $(BIN) $(FAKE_DIFY) $(E2E_BINS)
	bash tests/valgrind/run.sh $(BUILD)
# ---- end ThreadSanitizer and valgrind ----

# ---- container image (issue 18) ----
#   make image-test  build docker/Dockerfile with podman (no Docker daemon) on a
#                    debootstrapped Debian base cached in build/image/, and run it:
#                    unprivileged user, secrets files, spool volume, HEALTHCHECK,
#                    delivery, SIGTERM, restart on the same volume, nginx in front
#                    (tests/docker/image.sh). Not part of `make test`; .ci/run runs it.
.PHONY: image-test
image-test: $(BIN) $(FAKE_DIFY)
	bash tests/docker/image.sh $(BUILD)
# ---- end container image ----
