"""`axolotl rlora-report` and `axolotl rlora-export`: Axolotl loads these click commands through the
`axolotl.cli_commands` entry point."""

from __future__ import annotations

import click


@click.command("rlora-report")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write a PNG heatmap of head similarity.")
def rlora_report(adapter_dir: str, out: str | None) -> None:
    """Head-diversity report of a trained R-LoRA adapter (no base model needed)."""
    from rlora_plugin.report import report

    try:
        click.echo(report(adapter_dir, out))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("rlora-export")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--gates", default="uniform", show_default=True, help="'uniform', 'mean' or N constants.")
@click.option("--data", default=None, help="With --gates mean: a jsonl of prompts (`prompt`, chat or alpaca rows).")
@click.option("--base-model", default=None, help="With --gates mean: the base model (default: the adapter's).")
def rlora_export(adapter_dir: str, out_dir: str, gates: str, data: str | None, base_model: str | None) -> None:
    """Export an R-LoRA adapter with frozen gates as a plain LoRA (mergeable, servable anywhere)."""
    from rlora_plugin.export import export_lora, resolve_gates

    try:
        out = export_lora(adapter_dir, out_dir, resolve_gates(adapter_dir, gates, data, base_model))
        click.echo(f"plain LoRA (frozen gates {gates}) written to {out}")
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
