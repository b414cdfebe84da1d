"""benchmarks/serve.py's results/serve.md: every configuration's JSON side by side, each ratio the median of
the per-round ratios (paired), the targets' misses marked. The expected cells are worked out by hand below."""

from __future__ import annotations

import json

from benchmarks.serve import summary


def write_run(out, stem, dtype, tp, results):
    args = {"dtype": dtype, "tensor_parallel_size": tp, "one_thread": False}
    (out / f"{stem}.json").write_text(json.dumps({"args": args, "results": results}))


def rounds(tokens_per_s):
    return {"tokens_per_s": tokens_per_s, "ttft_s": [0.1] * len(tokens_per_s)}


def test_summary_pairs_rounds_marks_misses_and_orders_columns(tmp_path):
    # routed / base per round: 10/20, 20/10, 30/40 = 0.5, 2.0, 0.75 -> median 0.75 (a ratio of the medians
    # would give 20/20 = 1.0 and meet the target)
    write_run(tmp_path, "serve-float32-tp2", "float32", 2,
              {"qwen": {"8": {"base": rounds([20, 10, 40]), "routed": rounds([10, 20, 30])}}})  # fmt: skip
    write_run(tmp_path, "serve-bfloat16-tp1", "bfloat16", 1,
              {"qwen": {"8": {"base": rounds([10, 10]), "routed": rounds([9.5, 9.1]),
                              "export": rounds([5, 4])}}})  # fmt: skip
    write_run(tmp_path, "serve-float32-tp1", "float32", 1,
              {"qwen": {"8": {"base": rounds([10, 10]), "routed": rounds([9, 10])}}})  # fmt: skip
    (tmp_path / "serve-float32-tp1-1thread.json").write_text("not read")  # another mode: not in the summary
    lines = summary(tmp_path)
    assert lines[lines.index("") + 1 :][2:5] == [
        "- [serve-float32-tp1.md](serve-float32-tp1.md)",
        "- [serve-bfloat16-tp1.md](serve-bfloat16-tp1.md)",
        "- [serve-float32-tp2.md](serve-float32-tp2.md)",
    ]
    table = lines[lines.index("| model | concurrent requests | measure | target | float32, TP=1 | bfloat16, TP=1 "
                              "| float32, TP=2 |") :]  # fmt: skip
    assert table[2:] == [
        "| Qwen2.5-0.5B shape | 8 | routed / vLLM base | >= 0.9x | 0.95 (0.90-1.00) | 0.93 (0.91-0.95) "
        "| 0.75 (0.50-2.00) **missed** |",
        "| Qwen2.5-0.5B shape | 8 | routed / export | >= 0.8x | - | 2.09 (1.90-2.27) | - |",
        "| Qwen2.5-0.5B shape | 8 | vLLM, routed R-LoRA (plugin): tokens/s | - | 9.5 | 9.3 | 20.0 |",
        "| Qwen2.5-0.5B shape | 8 | vLLM, base model: tokens/s | - | 10.0 | 10.0 | 20.0 |",
    ]
