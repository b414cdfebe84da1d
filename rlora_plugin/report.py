"""Report on a trained R-LoRA adapter: how different its heads are, per adapted layer.

    python -m rlora_plugin.report ADAPTER_DIR [--out heads.png]
    axolotl rlora-report ADAPTER_DIR [--out heads.png]

Reads only `adapter_model.safetensors` and `adapter_config.json` (no base model). Prints one row per
adapted layer: the mean pairwise cosine similarity between the heads B_i and between their effective
updates B_i A (1: the heads are copies of each other; the R-LoRA paper reports about 0.76-0.80 for trained
HydraLoRA heads), the Frobenius norm of the router W_g and of the frozen offset map s * mean_i(B_i^0) A^0.
With `--out`, writes a PNG with the head-to-head cosine similarity of B_i A for every layer.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RLoraConfig
from .layer import adapter_scaling
from .metrics import head_cosine_B, head_cosine_BA, mean_off_diagonal, module_kind
from .saved import read_adapter


@dataclass
class LayerReport:
    name: str
    cos_b: float
    cos_ba: float
    router_norm: float
    offset_norm: float | None
    cos_ba_matrix: torch.Tensor


def _module_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def analyse(config: RLoraConfig, modules: dict[str, dict[str, torch.Tensor]]) -> list[LayerReport]:
    heads, scaling = config.num_heads, adapter_scaling(config)
    reports = []
    for name in sorted(modules, key=_module_order):
        parts = modules[name]
        if "A" not in parts or "B" not in parts:
            continue
        cos_ba = head_cosine_BA(parts["A"], parts["B"], heads)
        offset = None
        if "offset_A" in parts and "offset_B" in parts:  # ||B0 A0||_F = sqrt(tr((B0^T B0)(A0 A0^T)))
            a0, b0 = parts["offset_A"], parts["offset_B"]
            offset = scaling * float(((b0.T @ b0) * (a0 @ a0.T)).sum().clamp_min(0).sqrt())
        reports.append(
            LayerReport(
                name=name,
                cos_b=mean_off_diagonal(head_cosine_B(parts["B"], heads)),
                cos_ba=mean_off_diagonal(cos_ba),
                router_norm=float(parts["router"].norm()) if "router" in parts else float("nan"),
                offset_norm=offset,
                cos_ba_matrix=cos_ba,
            )
        )
    return reports


def format_table(config: RLoraConfig, reports: list[LayerReport]) -> str:
    width = max([len("layer")] + [len(r.name) for r in reports])
    lines = [
        f"R-LoRA adapter: {len(reports)} layers, {config.num_heads} heads, r={config.r}, "
        f"init={config.init}, head_dropout={config.head_dropout}",
        "mean pairwise head cosine similarity (1 = identical heads), router and offset Frobenius norms",
        "",
        f"{'layer':<{width}}  {'cos(B_i)':>9}  {'cos(B_i A)':>10}  {'|W_g|':>9}  {'|offset|':>9}",
    ]
    for rep in reports:
        offset = "-" if rep.offset_norm is None else f"{rep.offset_norm:9.4f}"
        lines.append(f"{rep.name:<{width}}  {rep.cos_b:9.4f}  {rep.cos_ba:10.4f}  {rep.router_norm:9.4f}  {offset:>9}")
    if reports:
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        lines.append(
            f"{'mean':<{width}}  {mean([r.cos_b for r in reports]):9.4f}  {mean([r.cos_ba for r in reports]):10.4f}"
            f"  {mean([r.router_norm for r in reports]):9.4f}"
        )
    return "\n".join(lines)


def plot_heatmaps(reports: list[LayerReport], out: str | Path, title: str = "") -> Path:
    """One heatmap of cos(B_i A, B_j A) per layer: module kinds as columns, depth as rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(module_kind(r.name) for r in reports))
    # one row per depth (the numeric parts of the module name, e.g. the decoder layer index)
    by_depth: dict[str, dict[str, LayerReport]] = {}
    for rep in reports:
        digits = [p for p in rep.name.split(".") if p.isdigit()]
        by_depth.setdefault(".".join(digits) or "-", {})[module_kind(rep.name)] = rep
    depths = list(by_depth)
    size = 1.6
    fig, axes = plt.subplots(
        len(depths),
        len(kinds),
        figsize=(size * len(kinds) + 1.2, size * len(depths) + 0.8),
        squeeze=False,
    )
    image = None
    for i, depth in enumerate(depths):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            rep = by_depth[depth].get(kind)
            if rep is None:
                ax.axis("off")
                continue
            image = ax.imshow(rep.cos_ba_matrix.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
            ax.set_title(f"{depth} {kind}\nmean {rep.cos_ba:.2f}", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="cos(B_i A, B_j A)")
    fig.suptitle(title or "R-LoRA head-to-head similarity of B_i A", fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(adapter_dir: str | Path, out: str | Path | None = None) -> str:
    """Print-ready table for the adapter in `adapter_dir`; with `out`, also write the heatmap PNG."""
    config, modules, _ = read_adapter(adapter_dir)
    reports = analyse(config, modules)
    text = format_table(config, reports)
    if out is not None:
        path = plot_heatmaps(reports, out, title=f"{Path(adapter_dir).name}: cos(B_i A, B_j A) per layer")
        text += f"\n\nheatmap written to {path}"
    else:
        text += "\n\nno heatmap written: pass --out FILE.png for one"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlora_plugin.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="directory with adapter_model.safetensors and adapter_config.json")
    parser.add_argument("--out", help="write a PNG heatmap of head-to-head similarity per layer here")
    args = parser.parse_args(argv)
    try:
        print(report(args.adapter_dir, args.out))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
