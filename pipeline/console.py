"""The command line's edge, shared by `sft` (pipeline/cli.py) and its release commands
(pipeline/release.py): params.yaml, errors in red with exit code 1, stage folder options."""

from __future__ import annotations

import functools
from typing import NoReturn

import typer

from pipeline.config import ConfigError, load_params
from pipeline.paths import PATHS
from pipeline.stages import StageError

PARAMS = "params.yaml"


def fail(message: str) -> NoReturn:
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(1)


def params():
    try:
        return load_params(PARAMS)
    except ConfigError as err:
        fail(str(err))


def reports_errors(command):
    """A command whose stage raises StageError: the message in red, exit code 1."""

    @functools.wraps(command)
    def wrapped(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StageError as err:
            fail(str(err))

    return wrapped


def folder(name: str, what: str):
    """A stage folder option (`--validate validate`): dvc.yaml names each stage's folders in its command."""
    return typer.Option(getattr(PATHS, name), f"--{name.replace('_', '-')}", help=what)
