"""Every shipped workflow and SkyPilot task parses, and the workflows keep their safety habits."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.yml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_pinned_and_least_privilege(path):
    workflow = yaml.safe_load(path.read_text())
    assert workflow["permissions"] == {"contents": "read"}, "least privilege: read-only by default"
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), f"pin {step['uses']} by SHA"
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False
            # untrusted input reaches shell only through env, never ${{ }} inside run:
            assert "${{" not in step.get("run", ""), f"{path.name}: expression inside run: of {step.get('name')}"


def test_sky_task_asks_for_eight_gpu_nodes_and_the_hub_token():
    task = yaml.safe_load((ROOT / "sky/train.yaml").read_text())
    assert set(task["resources"]["accelerators"]) == {"H100:8", "H200:8"}
    assert "HF_TOKEN" in task["secrets"]
