"""The command line: thin; heavy imports happen inside the commands."""

from __future__ import annotations

import sys

import click

from . import __version__
from .config import PrefoptError


def _fail(err: Exception) -> None:
    click.echo(f"prefopt: error: {err}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prefopt")
def main() -> None:
    """prefopt: one YAML recipe chains SFT into DPO, ORPO or SimPO on a 4-bit DoRA base."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. stages.1.beta=0.2")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<name>/).")
@click.option("--fresh", is_flag=True, help="Start over: delete the run folder's stages first.")
def run(recipe: str, overrides: tuple[str, ...], output_dir: str | None, fresh: bool) -> None:
    """Run every stage of RECIPE in order, resuming a previous run of it."""
    from .config import load_recipe

    try:
        rec = load_recipe(recipe, list(overrides))
        from .pipeline import run as run_pipeline

        result = run_pipeline(rec, output_dir=output_dir, fresh=fresh, echo=lambda s: click.echo(s, err=True))
    except PrefoptError as e:
        _fail(e)
    except KeyboardInterrupt:
        click.echo("prefopt: interrupted; finished stages are kept, re-run the same command to resume", err=True)
        sys.exit(130)
    click.echo(f"run folder: {result.run_dir}")
    for s in result.stages:
        click.echo(f"  {s.name}: {s.adapter}{' (skipped, unchanged)' if s.skipped else ''}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
def plan(recipe: str, overrides: tuple[str, ...]) -> None:
    """Validate RECIPE and show what `prefopt run` would do: resolved recipe, stages, data sizes, trainable params."""
    from .config import load_recipe

    try:
        rec = load_recipe(recipe, list(overrides))
        from .plan import make_plan

        text = make_plan(rec)
    except PrefoptError as e:
        _fail(e)
    click.echo(text)


if __name__ == "__main__":  # pragma: no cover
    main()
