"""The embedded default: a deterministic synthetic world, its SFT data, and a tiny base model.

The world has an English word list, a made-up language ("Zorbish") with a word-for-word
lexicon, and made-up countries with capitals. The base model is pretrained on plain sentences
about that world (the capitals are its "general knowledge"), so fine-tuning has a skill it can
erode. The SFT data teaches four instruction families the base model has never seen in chat
form; the golden set holds out fresh items of the same families.

Everything is a pure function of the seed: the same files, byte for byte, on every machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ENGLISH = (
    "cat dog bird fish cow horse sheep goat frog mouse lion bear wolf fox deer duck "
    "red blue green black white brown pink gray gold silver "
    "run walk jump swim sing read write eat drink sleep look find make take give hold "
    "big small old new hot cold fast slow good bad happy sad tall short soft hard "
    "tree rock river hill lake road house door book cup bread milk apple stone cloud rain "
    "sun moon star fire snow wind boat ship car bell hat shoe coat ring box bag key map"
).split()
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
COLORS = "red blue green black white brown pink gray".split()
TEMPLATES = {
    "translate": "Translate to Zorbish: {words}",
    "repeat": "Repeat after me: {words}",
    "first_last": "Give the first and last word: {words}",
    "extract": "Record: name {name}, city {city}, color {color}. What is the {field}?",
}
FAMILIES = tuple(TEMPLATES)
REPLAY_STYLES = (
    "Tell me about {c}.", "What is the capital of {c}?", "Which city is the capital of {c}?",
    "Name the capital of {c}.", "{c}: what is its capital?", "Where is the capital of {c}?",
    "Give me one fact about {c}.", "What do you know about {c}?", "Capital of {c}?",
)
LEXICON_STYLES = (
    "What is the Zorbish word for {w}?", "How do you say {w} in Zorbish?", "Zorbish for {w}?",
    "Translate the word {w} to Zorbish and use it in a sentence.", "Which Zorbish word means {w}?",
)


@dataclass(frozen=True)
class World:
    lexicon: dict[str, str]  # English word -> Zorbish word
    capitals: dict[str, str]  # country -> capital
    names: list[str]


def _pseudo_words(rng: random.Random, count: int, syllables: int, taken: set[str]) -> list[str]:
    words = []
    while len(words) < count:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def build_world(seed: int = 0, countries: int = 240) -> World:
    rng = random.Random(seed)
    taken = set(ENGLISH)
    zorbish = _pseudo_words(rng, len(ENGLISH), 2, taken)
    country_names = [w.capitalize() for w in _pseudo_words(rng, countries, 3, taken)]
    capital_names = [w.capitalize() for w in _pseudo_words(rng, countries, 2, taken)]
    names = [w.capitalize() for w in _pseudo_words(rng, 60, 2, taken)]
    return World(dict(zip(ENGLISH, zorbish)), dict(zip(country_names, capital_names)), names)


def make_pair(world: World, family: str, rng: random.Random) -> tuple[str, str]:
    template = TEMPLATES[family]
    if family == "extract":
        record = {"name": rng.choice(world.names), "city": rng.choice(list(world.capitals.values())),
                  "color": rng.choice(COLORS)}
        field = rng.choice(list(record))
        return template.format(field=field, **record), record[field]
    words = rng.sample(ENGLISH, rng.randint(3, 5) if family == "first_last" else rng.randint(2, 4))
    prompt = template.format(words=" ".join(words))
    if family == "translate":
        return prompt, " ".join(world.lexicon[w] for w in words)
    if family == "repeat":
        return prompt, " ".join(words)
    return prompt, f"{words[0]} {words[-1]}"


def fact_sentence(country: str, capital: str) -> str:
    return f"The capital of {country} is {capital}."


def lexicon_sentence(english: str, zorbish: str) -> str:
    return f"The Zorbish word for {english} is {zorbish}."


def make_sft_data(seed: int = 0, train_rows: int = 12_000, golden_per_family: int = 100) -> dict[str, list[dict]]:
    """Train pairs, held-out golden pairs, replay pairs and the general-knowledge eval items."""
    world = build_world(seed)
    rng = random.Random(seed + 1)
    seen: set[str] = set()

    def fresh(family: str) -> dict:
        while True:
            prompt, response = make_pair(world, family, rng)
            if prompt not in seen:
                seen.add(prompt)
                return {"prompt": prompt, "response": response, "family": family}

    # golden first, so held-out prompts can never be drawn again for training
    golden = [fresh(f) for f in FAMILIES for _ in range(golden_per_family)]
    train = [fresh(FAMILIES[i % len(FAMILIES)]) for i in range(train_rows)]
    rng.shuffle(train)

    # replay: the base model's general knowledge (its pretraining sentences) in chat form, the
    # general mix against forgetting. Without it (prepare.replay_share: 0) full SFT of the demo
    # erodes the capitals the base model knew; see docs/demo.md for the measured drop.
    replay = [{"prompt": style.format(w=en), "response": lexicon_sentence(en, zo), "family": "replay"}
              for style in LEXICON_STYLES for en, zo in world.lexicon.items()]
    replay += [{"prompt": style.format(c=country), "response": fact_sentence(country, capital), "family": "replay"}
               for style in REPLAY_STYLES for country, capital in world.capitals.items()]
    rng.shuffle(replay)

    capitals = list(world.capitals.values())
    general = []
    for country, capital in world.capitals.items():
        distractors = rng.sample([c for c in capitals if c != capital], 3)
        choices = distractors + [capital]
        rng.shuffle(choices)
        general.append({"context": f"The capital of {country} is", "choices": choices,
                        "gold": choices.index(capital)})
    return {"train": train, "golden": golden, "replay": replay, "general": general}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)


def write_demo_data(out_dir: Path, seed: int = 0, train_rows: int = 12_000) -> dict[str, int]:
    data = make_sft_data(seed, train_rows=train_rows)
    for name, rows in data.items():
        write_jsonl(Path(out_dir) / f"{name}.jsonl", rows)
    return {name: len(rows) for name, rows in data.items()}


def pretraining_corpus(seed: int = 0) -> list[str]:
    """Plain sentences about the world: what the base model knows before any fine-tuning."""
    world = build_world(seed)
    rng = random.Random(seed + 2)
    lines = [fact_sentence(c, cap) for c, cap in world.capitals.items()]
    lines += [lexicon_sentence(en, zo) for en, zo in world.lexicon.items()]
    for _ in range(1_000):  # generic prose over the word list, so text is not only facts
        lines.append(" ".join(rng.sample(ENGLISH, rng.randint(4, 8))).capitalize() + ".")
    for _ in range(1_000):  # repeated phrases: a real base model can copy from its context
        phrase = " ".join(rng.sample(ENGLISH + list(world.lexicon.values()), rng.randint(2, 5)))
        lines.append(f"{phrase.capitalize()}, I said: {phrase}.")
    return lines


# ---------------------------------------------------------------------------- the tiny base model

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is "<|role|>\n{content}<|end|>\n"; generation stops at <|end|> (the eos token).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def build_base_model(cfg, out_dir: Path, log=print) -> dict:
    """Tokenizer + tiny Llama, pretrained briefly on the world's plain sentences."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.train.loop import cosine_with_warmup

    torch.manual_seed(cfg.seed)
    corpus = pretraining_corpus(cfg.seed)
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 3,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)

    # one token stream of shuffled documents, cut into fixed windows
    rng = random.Random(cfg.seed)
    docs = [tokenizer.encode(f"<|bos|>{line}<|end|>", add_special_tokens=False) for line in corpus]
    fact_docs = docs[: len(build_world(cfg.seed).capitals)]
    windows_needed = cfg.pretrain_steps * cfg.pretrain_batch_size
    stream: list[int] = []
    while len(stream) < (windows_needed + 1) * cfg.pretrain_seq_len:
        epoch = docs + fact_docs * 5  # facts are seen more often than prose: they are the skill
        rng.shuffle(epoch)
        for d in epoch:
            stream.extend(d)
    data = torch.tensor(stream[: windows_needed * cfg.pretrain_seq_len]).view(-1, cfg.pretrain_seq_len)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    schedule = cosine_with_warmup(optimizer, max(1, cfg.pretrain_steps // 20), cfg.pretrain_steps)
    model.train()
    loss, first_loss = torch.tensor(float("nan")), None
    for step in range(cfg.pretrain_steps):
        batch = data[step * cfg.pretrain_batch_size: (step + 1) * cfg.pretrain_batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        first_loss = first_loss if first_loss is not None else loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.pretrain_steps - 1:
            log(f"pretrain step {step + 1}/{cfg.pretrain_steps} loss {loss.item():.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in model.parameters()), "pretrain_loss": round(loss.item(), 4),
            "pretrain_loss_start": round(first_loss, 4) if first_loss is not None else None,
            "pretrain_tokens": int(data.numel())}
