"""The demo's eval suites: lm-eval's own IFEval checks offline, the refusal rule, and the data
behind each suite (held out, paired look-alikes, CrowS-Pairs-style pairs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import INSTRUCTIONS, REFUSAL, make_sft_data

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "evals/tasks"
sys.path.insert(0, str(TASKS))

from refusal import is_refusal  # noqa: E402  (evals/tasks/refusal.py: the documented rule)

# Runs in a fresh interpreter with the network cut and no nltk data: importing lm-eval's IFEval
# code must not try to download punkt_tab, and the demo's instruction types must still be scored.
OFFLINE_SCRIPT = """
import json, socket, sys
attempts = []
def refuse(self, *args, **kwargs):
    attempts.append(args)
    raise OSError("network is off in this test")
socket.socket.connect = refuse
sys.path.insert(0, sys.argv[1])
import ifeval_offline
scores = []
for doc, response in json.loads(sys.stdin.read()):
    scores.append(ifeval_offline.process_results(doc, [response])["prompt_level_strict_acc"])
print(json.dumps({"attempts": len(attempts), "scores": scores}))
"""


def test_ifeval_checks_run_offline_and_agree_with_the_demo_data(tmp_path):
    """The responses the demo trains on follow each instruction by lm-eval's own check; the bare
    answer without the formatting does not."""
    import random

    from pipeline.demo import build_world, make_instruction

    world, rng = build_world(0), random.Random(0)
    cases = []
    for kind in INSTRUCTIONS:
        item = make_instruction(world, kind, rng)
        doc = {"key": 0, "prompt": item["prompt"], "instruction_id_list": [kind], "kwargs": [item["kwargs"]]}
        bare = item["prompt"].split(": ")[1].split(".")[0]  # the words alone
        cases += [(doc, item["response"]), (doc, bare)]
    assert {doc["instruction_id_list"][0] for doc in make_sft_data(train_rows=100)["ifeval"]} == set(INSTRUCTIONS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NLTK_DATA": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(TASKS)],
        input=json.dumps(cases),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["attempts"] == 0, "importing lm-eval's IFEval checks tried to reach the network"
    assert result["scores"] == [True, False] * len(INSTRUCTIONS)


@pytest.mark.parametrize(
    "response, refused",
    [
        (REFUSAL, True),
        ("  I can't do that.", True),
        ("I\u2019m sorry, no.", True),
        ('"I will not."', True),
        ("To feed the horse, go slowly and be gentle.", False),
        ("Sure. I won't forget: feed it hay.", False),
        ("", False),
    ],
)
def test_refusal_rule(response, refused):
    assert is_refusal(response) is refused


def test_safety_data_pairs_harmful_requests_with_benign_look_alikes():
    data = make_sft_data()
    harmful, benign = data["refusal"], data["over_refusal"]
    assert len(harmful) == len(benign) == 100
    for h, b in zip(harmful, benign, strict=True):  # the same request, one verb apart
        assert len(h["prompt"].split()) == len(b["prompt"].split())
        assert sum(x != y for x, y in zip(h["prompt"].split(), b["prompt"].split(), strict=True)) == 1
    train = [r for r in data["train"] if r["family"] == "safety"]
    refused = [r for r in train if is_refusal(r["response"])]
    assert 0.4 < len(refused) / len(train) < 0.6, "training teaches both refusing and answering"
    held_out = {r["prompt"] for r in harmful + benign}
    assert not held_out & {r["prompt"] for r in data["train"]}
    assert not {r["prompt"] for r in data["ifeval"]} & {r["prompt"] for r in data["train"]}


def test_bias_pairs_differ_in_one_demographic_term():
    from pipeline.demo import GROUPS

    groups = {g for a, b, *_ in GROUPS for g in (a, b)}
    for pair in make_sft_data()["bias"]:
        more, less = pair["sent_more"].rstrip(".").split(), pair["sent_less"].rstrip(".").split()
        diff = [(x, y) for x, y in zip(more, less, strict=True) if x != y]
        assert len(more) == len(less) and len(diff) == 1 and set(diff[0]) <= groups
