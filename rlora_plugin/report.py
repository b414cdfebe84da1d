"""Report on a trained R-LoRA adapter: how different its heads are, per adapted layer.

    python -m rlora_plugin.report ADAPTER_DIR [--out heads.png]
    axolotl rlora-report ADAPTER_DIR [--out heads.png]

Reads only `adapter_model.safetensors` and `adapter_config.json` (no base model). Prints one row per
adapted layer: the mean pairwise cosine similarity between the heads B_i and between their effective
updates B_i A (1: the heads are copies of each other; the R-LoRA paper reports about 0.76-0.80 for trained
HydraLoRA heads), the Frobenius norm of the router W_g and of the frozen offset map s * mean_i(B_i^0) A^0.
With `--out`, writes a PNG: the mean head similarity per layer (one line per module kind) and, for small
adapters (up to 32 decoder layers), a head-to-head heatmap of cos(B_i A, B_j A) for every adapted module.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RLoraConfig
from .layer import adapter_scaling
from .metrics import head_cosine_B, head_cosine_BA, low_rank_norm, mean_off_diagonal, module_kind
from .saved import module_order, read_adapter


@dataclass
class LayerReport:
    name: str
    cos_b: float
    cos_ba: float
    router_norm: float
    offset_norm: float | None
    cos_ba_matrix: torch.Tensor


def analyse(config: RLoraConfig, modules: dict[str, dict[str, torch.Tensor]]) -> list[LayerReport]:
    heads, scaling = config.num_heads, adapter_scaling(config)
    reports = []
    for name in sorted(modules, key=module_order):
        parts = modules[name]
        if "A" not in parts or "B" not in parts:
            continue
        cos_ba = head_cosine_BA(parts["A"], parts["B"], heads)
        offset = None
        if "offset_A" in parts and "offset_B" in parts:
            offset = scaling * low_rank_norm(parts["offset_B"], parts["offset_A"])
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
        offsets = [r.offset_norm for r in reports if r.offset_norm is not None]
        offset = f"{mean(offsets):9.4f}" if offsets else "-"
        lines.append(
            f"{'mean':<{width}}  {mean([r.cos_b for r in reports]):9.4f}  {mean([r.cos_ba for r in reports]):10.4f}"
            f"  {mean([r.router_norm for r in reports]):9.4f}  {offset:>9}"
        )
    return "\n".join(lines)


HEATMAP_LAYERS = 32  # up to this many decoder layers the image also holds every module's head-to-head heatmap


def _depth(name: str) -> str:
    """The numeric parts of a module name (the decoder layer index): `model.layers.3.mlp.up_proj` -> `3`."""
    return ".".join(p for p in name.split(".") if p.isdigit()) or "-"


def decoder_layers(reports: list[LayerReport]) -> int:
    """How many decoder layers (depths) the adapter spans: 30 for 3 modules in each of 30 layers."""
    return len({_depth(r.name) for r in reports})


def similarity_limits(values: list[float]) -> tuple[float, float]:
    """The y-range of the similarity plot: the data's range with a margin (at least 0.05 wide), within
    [-1.05, 1.05], so that values of 0.03-0.09 are not a flat band in a -1..1 axis."""
    finite = [v for v in values if v == v]  # drop NaN (a module kind missing at some depth)
    if not finite:
        return -1.05, 1.05
    low, high = min(finite), max(finite)
    margin = max(0.1 * (high - low), 0.025)
    return max(low - margin, -1.05), min(high + margin, 1.05)


def plot_report(reports: list[LayerReport], out: str | Path, title: str = "") -> Path:
    """Mean head similarity per depth, one line per module kind (readable at any depth); for adapters of up
    to `HEATMAP_LAYERS` decoder layers also one head-to-head heatmap per module, depth as rows, kinds as
    columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(module_kind(r.name) for r in reports))
    by_depth: dict[str, dict[str, LayerReport]] = {}
    for rep in reports:
        by_depth.setdefault(_depth(rep.name), {})[module_kind(rep.name)] = rep
    depths = list(by_depth)
    grid = decoder_layers(reports) <= HEATMAP_LAYERS
    cell = 1.5
    width = max(7.0, cell * len(kinds) + 1.5) if grid else 7.0
    heights = [3.0] + ([cell * len(depths)] if grid else [])
    fig = plt.figure(figsize=(width, sum(heights) + 0.6), layout="constrained")
    figures = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]

    ax = figures[0].subplots()
    positions = range(len(depths))
    for kind in kinds:
        ax.plot(positions, [by_depth[d][kind].cos_ba if kind in by_depth[d] else float("nan") for d in depths],
                marker="o", markersize=3, label=kind)  # fmt: skip
    ax.set_xticks(list(positions), depths, fontsize=7)
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel("mean cos(B_i A, B_j A)")
    low, high = similarity_limits([r.cos_ba for r in reports])
    ax.set_ylim(low, high)
    if low < 0 < high:
        ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7, ncols=min(len(kinds), 4), loc="best")
    ax.set_title(title or "R-LoRA head similarity per layer", fontsize=9)

    if grid:
        axes = figures[1].subplots(len(depths), len(kinds), squeeze=False)
        image = None
        for i, depth in enumerate(depths):
            for j, kind in enumerate(kinds):
                cell_ax, rep = axes[i][j], by_depth[depth].get(kind)
                if rep is None:
                    cell_ax.axis("off")
                    continue
                heads = rep.cos_ba_matrix.shape[0]
                image = cell_ax.imshow(rep.cos_ba_matrix.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
                cell_ax.set_xticks(range(heads), range(heads), fontsize=5)
                cell_ax.set_yticks(range(heads), range(heads), fontsize=5)
                cell_ax.set_title(f"{depth} {kind}: {rep.cos_ba:.2f}", fontsize=6)
        if image is not None:
            figures[1].colorbar(image, ax=axes, shrink=0.8, label="cos(B_i A, B_j A), head i vs head j")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(adapter_dir: str | Path, out: str | Path | None = None) -> str:
    """Print-ready table for the adapter in `adapter_dir`; with `out`, also write the plot (PNG)."""
    config, modules, _ = read_adapter(adapter_dir)
    reports = analyse(config, modules)
    text = format_table(config, reports)
    if out is not None:
        path = plot_report(reports, out, title=f"{Path(adapter_dir).name}: head similarity per layer")
        too_deep = decoder_layers(reports) > HEATMAP_LAYERS
        grid = f" (no per-layer heatmaps above {HEATMAP_LAYERS} layers)" if too_deep else ""
        text += f"\n\nplot written to {path}{grid}"
    else:
        text += "\n\nno plot written: pass --out FILE.png for one"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlora_plugin.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="directory with adapter_model.safetensors and adapter_config.json")
    parser.add_argument("--out", help="write a PNG plot of head similarity per layer here")
    args = parser.parse_args(argv)
    try:
        print(report(args.adapter_dir, args.out))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
