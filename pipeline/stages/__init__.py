"""One module per dvc.yaml stage: `run(params, paths, ...) -> summary`, IO at its edge.

`sft <stage>` (pipeline/cli.py) parses options, calls `run` and prints; a stage raises only
`StageError`, whose message names the file, row or setting and what to change.
"""


class StageError(Exception):
    """What stops a stage; the message is what the user reads."""
