# allcnn: one-command set-up, tests and the main job.  `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SETUP_STAMP    := $(VENV)/.setup-stamp
BACKENDS_STAMP := $(VENV)/.backends-stamp

export JUPYTER_PLATFORM_DIRS := 1
export TF_CPP_MIN_LOG_LEVEL  := 3
export PYTHONDONTWRITEBYTECODE := 1

FINAL_MODEL := data/final_model

NBVAL_FLAGS := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg \
               --nbval-cell-timeout=600

.PHONY: help setup test lint unit nbtest run notebooks lab data sample bench experiments recipe \
        evaluate \
        clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(SETUP_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(BACKENDS_STAMP): $(SETUP_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,backends]'
	touch $@

setup: $(SETUP_STAMP)  ## create .venv and install the project with its test extra

lint: $(SETUP_STAMP)  ## ruff on the library, tests, scripts and notebooks
	$(BIN)/ruff check $(wildcard allcnn_lib tests scripts benchmarks notebooks conftest.py)

unit: $(BACKENDS_STAMP)  ## unit tests only (quick mode)
	ALLCNN_QUICK=1 $(BIN)/python -m pytest tests

nbtest: $(SETUP_STAMP)  ## notebooks under nbval only (quick mode)
	ALLCNN_QUICK=1 $(BIN)/python -m pytest $(NBVAL_FLAGS) notebooks

test: $(BACKENDS_STAMP) lint  ## THE test command: ruff, unit tests and nbval on every notebook, quick mode
	ALLCNN_QUICK=1 $(BIN)/python -m pytest -n 2 --dist loadscope $(NBVAL_FLAGS) tests notebooks

run: $(SETUP_STAMP)  ## the main job: execute every notebook on the default data, render HTML under build/
	$(BIN)/python scripts/run_notebooks.py --out build

notebooks: $(SETUP_STAMP)  ## re-execute the notebooks in place (standard run; refreshes saved outputs)
	$(BIN)/python scripts/run_notebooks.py --inplace

lab: $(SETUP_STAMP)  ## JupyterLab on the notebooks
	$(BIN)/jupyter lab notebooks/

data:  ## unpack the full CIFAR-10 (JPEG copy) from ../shared/ into data/ (project machines only)
	@test -f ../shared/cifar10/unpack.py || { echo "no ../shared/cifar10 here: load_cifar10() downloads the official archive instead"; exit 1; }
	$(BIN)/python ../shared/cifar10/unpack.py data/
	$(BIN)/python -m allcnn_lib verify-data --data-dir data  # md5s and images per class

sample: $(SETUP_STAMP)  ## rebuild the shipped sample data/cifar10_sample.npz from ../shared/cifar10
	$(BIN)/python scripts/make_sample.py

bench: $(BACKENDS_STAMP)  ## speed table -> docs/performance.md (5-20 min; NOTEBOOKS=1 ACCURACY=1 add more)
	$(BIN)/python benchmarks/run_all.py $(if $(NOTEBOOKS),--notebooks) $(if $(ACCURACY),--accuracy)

experiments: $(SETUP_STAMP)  ## the four experiments, resumable, into results/ (hours on a CPU; see --list)
	$(BIN)/python scripts/run_experiments.py

recipe: $(SETUP_STAMP)  ## the fast recipe's ablation and time-to-accuracy ladder into results/recipe/ (hours)
	$(BIN)/python scripts/run_experiments.py --experiments recipe_ablation recipe_ladder

evaluate: $(SETUP_STAMP)  ## the shipped final model (data/final_model) on the test set: accuracy and loss
	@cd $(FINAL_MODEL) 2>/dev/null && md5sum --quiet -c MD5SUMS 2>/dev/null || { \
	  echo "error: $(FINAL_MODEL)/ is missing or its files do not match its MD5SUMS;" \
	       "restore them with: git checkout -- $(FINAL_MODEL)" >&2; exit 1; }
	$(BIN)/python -m allcnn_lib evaluate \
	  --weights $(FINAL_MODEL)/model.weights.h5 --out build/evaluate/confusion_matrix.png

clean:  ## remove build outputs (keeps .venv and data)
	rm -rf build .pytest_cache
