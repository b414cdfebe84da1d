"""A test-only Axolotl plugin: what `torch_compile: true` compiled in the training run.

`post_train` (its first call, right after `trainer.train()`) writes `compile_probe.json` in `output_dir`:
TorchDynamo's process-wide counters, i.e. how many graphs were compiled and every graph break with its
reason (the R-LoRA layers must add none).
"""

from __future__ import annotations

import json
from pathlib import Path

from axolotl.integrations.base import BasePlugin


class CompileProbePlugin(BasePlugin):
    def post_train(self, cfg, model):  # called twice by Axolotl: keep the first record
        out = Path(cfg.output_dir) / "compile_probe.json"
        if cfg.adapter != "rlora" or out.exists():
            return
        from torch._dynamo.utils import counters

        record = {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": dict(counters["graph_break"])}
        out.write_text(json.dumps(record, indent=1))
