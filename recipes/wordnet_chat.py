"""WordNet 3.0 as a chat instruction set: "What does the noun 'X' mean?" -> its gloss and an example.

    train_file, eval_file = wordnet_chat_files()     # JSONL of {"messages": [...]}, cached, built once
    train_file, eval_file = wordnet_pair_files()     # JSONL of {"prompt", "chosen", "rejected"} (DPO), the same split

One example per synset (117,659; words use `_` for spaces in the files). The split is by the word
asked about, seeded: a word whose hash lands in the eval share is asked only in eval.jsonl, so eval
words are never seen in training (not even through another of their senses). The files are plain
`messages` JSONL: the SFT recipe reads them back through the same loader as a user's own data.
The preference pairs ask the same question; chosen is the word's own definition, rejected the definition of
another synset of the same part of speech (seeded), both as '"X" (noun): <definition>.' (no usage example: it
would name the other word and give the answer away).
Source format (Debian wordnet-base, /work/shared/DATA.md): `offset lex_filenum ss_type w_cnt word
lex_id [word lex_id ...] p_cnt [ptr ...] [frames ...] | gloss`, hex w_cnt, Latin-1, licence lines
start with two spaces.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

from qlora.bundled import default_cache_dir
from qlora_recipes.bundled_data import WORDNET_FILES, wordnet_dir

VERSION = 1                    # bump when the question/answer wording changes: a new cache folder
POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def parse_line(line: str) -> dict | None:
    """One data.* line -> {"word", "pos", "definition", "examples"} (None for licence lines)."""
    if line.startswith("  ") or "|" not in line:
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    word = re.sub(r"\([a-z]+\)$", "", fields[4]).replace("_", " ")   # adjectives may carry (a)/(p)/(ip)
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = gloss.split('"')[0].strip().rstrip(";").strip()
    return {"word": word, "pos": POS[fields[2]], "definition": definition, "examples": examples}


def to_chat(entry: dict) -> dict:
    answer = f'"{entry["word"]}" ({entry["pos"]}): {entry["definition"]}.'
    if entry["examples"]:
        answer += f' For example: "{entry["examples"][0]}"'
    question = f"What does the {entry['pos']} '{entry['word']}' mean?"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def is_eval_word(word: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{word.lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def entries() -> list[dict]:
    """Every synset with a definition, in the files' order (parse_line's dicts)."""
    source, out = wordnet_dir(), []
    for name in WORDNET_FILES:
        with open(source / name, encoding="latin-1") as f:
            out += [e for e in map(parse_line, f) if e is not None and e["definition"]]
    return out


def _cached_split(kind: str, rows, cache_dir, eval_fraction: float, seed: int) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) under $QLORA_CACHE/wordnet-KIND-v1-...: `rows(entries)` yields (word, row) and is
    called only when the files are not there yet; written once (temp names, then renamed)."""
    folder = Path(cache_dir or default_cache_dir()) / f"wordnet-{kind}-v{VERSION}-eval{eval_fraction:g}-seed{seed}"
    train, evals = folder / "train.jsonl", folder / "eval.jsonl"
    if train.is_file() and evals.is_file():
        return train, evals
    folder.mkdir(parents=True, exist_ok=True)
    tmp = {name: folder / f".{name}.tmp-{os.getpid()}" for name in ("train.jsonl", "eval.jsonl")}
    with open(tmp["train.jsonl"], "w") as ft, open(tmp["eval.jsonl"], "w") as fe:
        for word, row in rows(entries()):
            (fe if is_eval_word(word, eval_fraction, seed) else ft).write(json.dumps(row) + "\n")
    os.replace(tmp["eval.jsonl"], evals)
    os.replace(tmp["train.jsonl"], train)
    return train, evals


def wordnet_chat_files(cache_dir=None, eval_fraction: float = 0.02, seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of chats under $QLORA_CACHE/wordnet-chat-v1-..., written once."""
    return _cached_split("chat", lambda es: ((e["word"], to_chat(e)) for e in es), cache_dir, eval_fraction, seed)


def pair_answer(entry: dict, definition: str) -> list[dict]:
    return [{"role": "assistant", "content": f'"{entry["word"]}" ({entry["pos"]}): {definition}.'}]


def to_pairs(entries: list[dict], seed: int = 0):
    """(word, {"prompt", "chosen", "rejected"}) per synset: its definition against another synset's of the same
    part of speech (seeded)."""
    by_pos: dict[str, list[str]] = {}
    for e in entries:
        by_pos.setdefault(e["pos"], []).append(e["definition"])
    rng = random.Random(seed)
    for e in entries:
        other = e["definition"]
        while other == e["definition"]:
            other = rng.choice(by_pos[e["pos"]])
        question = [{"role": "user", "content": f"What does the {e['pos']} '{e['word']}' mean?"}]
        yield e["word"], {"prompt": question, "chosen": pair_answer(e, e["definition"]),
                          "rejected": pair_answer(e, other)}


def wordnet_pair_files(cache_dir=None, eval_fraction: float = 0.02, seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of preference pairs under $QLORA_CACHE/wordnet-pairs-v1-..., written once."""
    return _cached_split("pairs", lambda es: to_pairs(es, seed), cache_dir, eval_fraction, seed)
