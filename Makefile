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

# Optional benchmark peers and runs: never part of `make test` (llama.cpp compiles for 10-25 min on 2 cores).
.PHONY: peers bench bench-latency bench-throughput
BENCH_OUT ?= bench-out
BENCH_BACKENDS ?= nimblelm,transformers,llama.cpp

peers: setup
	nice -n 19 $(VENV)/bin/nimblelm bench setup llama.cpp

bench: bench-latency bench-throughput

bench-latency: setup model
	$(VENV)/bin/nimblelm bench latency --model $(MODEL) -p 512 -n 128 -b 1,8 -r 5 \
		--backends $(BENCH_BACKENDS) --output $(BENCH_OUT)/latency

bench-throughput: setup model
	$(VENV)/bin/nimblelm bench throughput --model $(MODEL) --dataset sharegpt --num-prompts 32 \
		--max-output-len 128 -r 3 --backends $(BENCH_BACKENDS) --output $(BENCH_OUT)/throughput
