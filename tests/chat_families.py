"""Tokenizers of other model families, built from the demo's BPE: their special tokens, BOS handling
and chat template, so the pipeline is exercised on what a team's base model really ships."""

from __future__ import annotations

import copy
from pathlib import Path

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def as_llama3(tokenizer):
    """A copy of `tokenizer` shaped like Llama 3.x Instruct's: <|begin_of_text|> prepended by the
    tokenizer itself (its post-processor) as well as printed by the template, <|eot_id|> ending every
    turn and serving as eos, and the family's chat template (the date line included)."""
    from tokenizers import processors

    llama = copy.deepcopy(tokenizer)
    llama.add_special_tokens(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "additional_special_tokens": LLAMA3_SPECIALS}
    )
    bos = llama.convert_tokens_to_ids("<|begin_of_text|>")
    llama.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    llama.chat_template = (TEMPLATES / "llama3.jinja").read_text()
    return llama


def convert_base_to_llama3(folder: Path) -> None:
    """A saved base model (weights + tokenizer) re-shaped in place as a Llama 3.x Instruct release:
    its tokenizer as `as_llama3`, embeddings grown for the new special tokens, ids in the configs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = as_llama3(AutoTokenizer.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
