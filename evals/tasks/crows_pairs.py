"""lm-eval's own CrowS-Pairs scoring, for the local bias task (a `!function` resolves beside the YAML)."""

from lm_eval.tasks.crows_pairs.utils import process_results  # noqa: F401
