# Convenience targets; the README's commands are the source of truth.
.PHONY: install test demo
install:
	python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[export,test,tensorrt]'
test:
	. .venv/bin/activate && python -m pytest -n 2
demo:
	. .venv/bin/activate && diffc build demo --profile cpu --out demo.diffc --force && \
	diffc run demo.diffc --prompt "a handwritten digit seven" --out demo.png
