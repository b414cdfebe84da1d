"""The speed and activation-memory benchmark (`python -m benchmarks.speed`): R-LoRA against LoRA and the
per-head loop. `counts` and `timing` are also used by the compile, generation and quality benchmarks."""
