"""Tokenizers of real chat-template families, built locally: one small byte-level BPE shared by all,
each copy given its family's special tokens, bos/eos and the chat template as its repository
publishes it (tests/fixtures/templates, sources in SOURCES.md)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"


@dataclass(frozen=True)
class Family:
    name: str
    template: str  # file under tests/fixtures/templates
    specials: tuple[str, ...]  # special added tokens (bos/eos included)
    stops: tuple[str, ...]  # where generation stops: the end of what the model generates for a turn
    bos: str | None = None
    eos: str | None = None
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen's <think>, <tool_call>)


QWEN = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
QWEN_ADDED = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
LLAMA = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)
MISTRAL = (
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[ARGS]",
    "[CALL_ID]",
    "[IMG]",
    "[TOOL_CONTENT]",
)
DEEPSEEK = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
)

FAMILIES = {
    f.name: f
    for f in [
        Family("qwen3", "Qwen-Qwen3-0.6B.jinja", QWEN, ("<|im_end|>",), eos="<|im_end|>", added=QWEN_ADDED),
        Family("qwen2.5", "Qwen-Qwen2.5-7B-Instruct.jinja", QWEN, ("<|im_end|>",), eos="<|im_end|>", added=QWEN_ADDED),
        Family(
            "llama3.3",
            "meta-llama-Llama-3.3-70B-Instruct.jinja",
            LLAMA,
            ("<|eot_id|>", "<|eom_id|>"),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
        ),
        Family(
            "llama3.2",
            "meta-llama-Llama-3.2-3B-Instruct.jinja",
            LLAMA,
            ("<|eot_id|>", "<|eom_id|>"),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
        ),
        Family(
            "gemma3",
            "google-gemma-3-it.jinja",
            ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"),
            ("<end_of_turn>",),
            bos="<bos>",
            eos="<eos>",
        ),
        Family(
            "gemma2",
            "google-gemma-2-2b-it.jinja",
            ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
            ("<end_of_turn>",),
            bos="<bos>",
            eos="<eos>",
        ),
        Family(
            "mistral-small-3.2", "Mistral-Small-3.2-24B-Instruct-2506.jinja", MISTRAL, ("</s>",), bos="<s>", eos="</s>"
        ),
        Family("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja", MISTRAL, ("</s>",), bos="<s>", eos="</s>"),
        Family(
            "phi-3.5",
            "microsoft-Phi-3.5-mini-instruct.jinja",
            ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            ("<|end|>",),
            bos="<s>",
            eos="<|endoftext|>",
        ),
        Family(
            "phi-4",
            "microsoft-phi-4.jinja",
            ("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"),
            ("<|im_end|>",),
            eos="<|im_end|>",
        ),
        Family(
            "gpt-oss",
            "openai-gpt-oss-120b.jinja",
            (
                "<|startoftext|>",
                "<|endoftext|>",
                "<|start|>",
                "<|end|>",
                "<|message|>",
                "<|channel|>",
                "<|return|>",
                "<|call|>",
                "<|constrain|>",
            ),
            ("<|return|>", "<|call|>"),
            eos="<|return|>",
        ),
        Family(
            "deepseek-r1-distill",
            "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
            DEEPSEEK,
            ("<｜end▁of▁sentence｜>",),
            bos="<｜begin▁of▁sentence｜>",
            eos="<｜end▁of▁sentence｜>",
            added=("<think>", "</think>"),
        ),
        Family(
            "granite-3.3",
            "ibm-granite-granite-3.3-2B-Instruct.jinja",
            (
                "<|end_of_text|>",
                "<|start_of_role|>",
                "<|end_of_role|>",
                "<|tool_call|>",
                "<|start_of_cite|>",
                "<|end_of_cite|>",
            ),
            ("<|end_of_text|>",),
            eos="<|end_of_text|>",
        ),
        Family(
            "chatml",
            "teknium-OpenHermes-2.5-Mistral-7B.jinja",
            ("<|im_start|>", "<|im_end|>", "<s>", "</s>"),
            ("<|im_end|>",),
            bos="<s>",
            eos="<|im_end|>",
        ),
    ]
}

CORPUS = [
    "The capital of Zorbia is Kel.",
    "Repeat after me: cat dog red.",
    "What is the weather in Paris?",
    "Think step by step, then answer.",
    '{"city": "Paris", "unit": "celsius"}',
    "get_weather returns 21 C.",
    "You are a helpful assistant.",
    "The answer is 42.",
    "end model user assistant system tool",
] * 20


@lru_cache(maxsize=1)
def _base():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainer=trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    return tok


@cache
def family_tokenizer(name: str):
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_base()),
        bos_token=family.bos,
        eos_token=family.eos,
        chat_template=(TEMPLATES / family.template).read_text(),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(family.specials)})
    tokenizer.add_tokens(list(family.added))
    return tokenizer
