"""Validate SkyPilot task YAMLs with SkyPilot's own schema and parser (`make test` runs it in .venv-sky).

SkyPilot is a separate tool environment (its click pin conflicts with this project's), so this
script imports only sky, yaml and jsonschema. Every error names the file and the field.
Usage: .venv-sky/bin/python sky/validate.py [task.yaml ...]   (default: sky/*.yaml)
"""

from __future__ import annotations

import sys
from pathlib import Path

import jsonschema
import yaml

# What train.yml passes at launch (--env / --secret) and the job relies on; see docs/ci.md
REQUIRED = {
    "train.yaml": {
        "envs": {"GIT_SHA", "GITHUB_REPOSITORY", "RUN_URL", "CHECKPOINT_BUCKET"},
        "secrets": {"HF_TOKEN", "GITHUB_TOKEN"},
    }
}


def problems(path: Path) -> list[str]:
    import sky
    from sky.utils import schemas

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        return [f"{path}: not valid YAML: {err}"]
    schema = schemas.get_task_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    found = [
        f"{path}: {'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
        for e in sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))
    ]
    for section, names in REQUIRED.get(path.name, {}).items():
        missing = sorted(names - set((raw or {}).get(section) or {}))
        if missing:
            found.append(f"{path}: {section}: must declare {', '.join(missing)}")
    if not found:
        try:  # SkyPilot's own parse: resources, accelerators, mounts, secrets
            sky.Task.from_yaml(str(path))
        except Exception as err:  # sky raises ValueError and its own exception types
            found.append(f"{path}: sky.Task.from_yaml: {type(err).__name__}: {err}")
    return found


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(Path(__file__).parent.glob("*.yaml"))
    errors = [message for path in paths for message in problems(path)]
    for message in errors:
        print(message, file=sys.stderr)
    if not errors:
        print(f"SkyPilot task schema: {', '.join(str(p) for p in paths)} valid")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
