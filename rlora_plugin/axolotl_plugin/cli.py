"""`axolotl rlora-report`: Axolotl loads this click command through the `axolotl.cli_commands` entry point."""

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
