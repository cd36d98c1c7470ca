# Two entry points on a fresh clone (with ../shared beside it, no network needed beyond PyPI):
#   make run   set up, pull the pinned data, compose params.yaml from conf/, run the pipeline (dvc repro)
#   make test  set up, run the tests
PYTHON ?= python3
PORT   ?= 5000
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The page `dvc plots show` fills (.dvc/config: plots.html_template), Vega's scripts inlined
PLOTS_PAGE := $(VENV)/share/dvc-plots.html
# Stage commands (`covidxray ...`) and dvc come from the venv, also for dvc's own subshells.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test lint setup data params ui clean

setup: $(STAMP) $(PLOTS_PAGE)

# Reinstall only when the pinned stack or the package metadata changes. uv (pinned, installed by
# the venv's pip) installs the stack: 19-28 s from an empty cache where pip took 41 s, 4 s from
# uv's cache on a rerun. Then compileall on every core (16-36 s): the bytecode must be written at
# setup, because where PYTHONDONTWRITEBYTECODE is set (many containers, these machines) Python
# never writes it and compiles TensorFlow from source at every start (`import tensorflow` 12.5 s
# instead of 4.5 s; benchmarks/bench_startup.py). The packages' own test suites (tests/ folders:
# 2,835 of 15,708 files, 43 of 238 MB; nothing the project runs imports them) are left out.
SITE = $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 -x '/tests/' $(SITE) src
	touch $(STAMP)

# Offline plots: the npm tarballs of manifests/vega.sha256 (npm pack fetches only those three
# files, no dependencies), checked and inlined into the page, so it draws without a CDN.
$(PLOTS_PAGE): manifests/vega.sha256 src/covidxray/tools/plots_page.py $(STAMP)
	mkdir -p $(VENV)/share/vega
	cd $(VENV)/share/vega && npm pack --silent --ignore-scripts \
	  $$($(abspath $(BIN))/python -m covidxray.tools.plots_page --npm-specs $(abspath manifests/vega.sha256)) >/dev/null
	$(BIN)/python -m covidxray.tools.plots_page manifests/vega.sha256 $(VENV)/share/vega $@

data: setup
	$(BIN)/dvc pull data.dvc

# params first: conf/ is the source of truth, and a stage run by DVC on a params.yaml that is not
# its composition stops ("params.yaml is stale: run make params").
run: data params
	$(BIN)/dvc repro

# With ../shared beside the clone (as in CI), the pinned data/external is pulled first, so the tests
# on the real collections run; -ra lists every skip with its reason. One pytest-xdist worker per core,
# idle workers taking queued tests (worksteal): most tests wait on one-threaded work (process start-up,
# imports, tiny trainings), so two workers on two cores took 483 s where one took 813 s.
test: setup lint
	if [ -d ../shared/dvc-remote ]; then $(BIN)/dvc pull -q data.dvc; fi
	$(BIN)/python -m pytest -ra -n auto --dist worksteal

# ruff: lint and format check (settings in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrite params.yaml from conf/ (what `dvc exp run` does before each experiment).
params: setup
	$(BIN)/covidxray params

# MLflow UI on the local store: make ui [PORT=5001]. MLflow's job execution (GenAI jobs, which this
# project has none of) is off: it starts seven huey consumer processes, ~28 s of CPU on start-up.
# One web worker, not MLflow's default four: one person's browser (each worker imports MLflow's
# server anew, ~3 s of CPU; ready in 5 s instead of 8 here).
ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db \
	  --host 127.0.0.1 --port $(PORT) --workers 1

clean:
	rm -rf $(VENV) outputs multirun
