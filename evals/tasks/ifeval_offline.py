"""lm-eval's own IFEval scoring (lm_eval.tasks.ifeval.utils.process_results), importable offline.

Importing lm_eval.tasks.ifeval.instructions_util calls nltk.download("punkt_tab") when that data
is missing, which reaches the network. Offline runs (HF_HUB_OFFLINE=1, the default here) skip
that download: the demo's instruction types (quotation, end phrase, bullet list, title) are
regex checks that never load nltk data. The types that do (sentence counts, capital-word
frequency) then fail with nltk's LookupError naming the missing resource, never silently.
"""

import contextlib
import io
import os

import nltk

_download = nltk.download
offline = os.environ.get("HF_HUB_OFFLINE", "0") == "1"
if offline:
    nltk.download = lambda *args, **kwargs: False
try:  # offline, its "Downloaded punkt_tab" line would be untrue: keep it out of the log
    with contextlib.redirect_stdout(io.StringIO()) if offline else contextlib.nullcontext():
        from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: F401
finally:
    nltk.download = _download
