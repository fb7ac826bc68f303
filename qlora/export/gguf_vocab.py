"""The tokenizer of a model folder as llama.cpp's GGUF keys (tokenizer.ggml.*, tokenizer.chat_template).

    warnings = write_tokenizer(writer, folder, vocab_size)

Two kinds, as llama.cpp's convert_hf_to_gguf.py writes them (our code; gguf-py's SpecialVocab for the merges,
special token ids and chat template, LlamaHfVocab for the sentencepiece-style vocabulary):
* byte-level BPE (tokenizer.json model BPE without byte fallback: Llama 3, Qwen, SmolLM) -> model "gpt2":
  tokens in id order, token types (added special tokens CONTROL, other added USER_DEFINED), merges, and the
  pre-tokenizer name llama.cpp recognises by hashing the tokens of a fixed text (PRE_TOKENIZERS; "default"
  with a warning for one it does not list);
* BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3's tokenizer.json) -> model "llama" with scores.
Run: pytest tests/qlora/export/test_gguf.py -k tokenizer.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from qlora.errors import QLoRAError

# llama.cpp's convert_hf_to_gguf.py get_vocab_base_pre: the text whose token ids identify a pre-tokenizer
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
              "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

# sha256(str(token ids of CHECK_TEXT)) -> llama.cpp's pre-tokenizer name (a few common ones of its table)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",        # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",            # Qwen 1.5 .. 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",           # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",           # Mistral Nemo
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}


def tokenizer_kind(folder: Path) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (BPE with byte fallback), from tokenizer.json; else one line."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise QLoRAError(f"{folder} has no tokenizer.json; GGUF export writes the tokenizer into the file and reads "
                         "it from there (save the tokenizer with the model). Nothing was written.")
    model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    if model.get("type") == "BPE":
        return "llama" if model.get("byte_fallback") else "gpt2"
    raise QLoRAError(f"{path}: a {model.get('type')!r} tokenizer; GGUF export writes BPE tokenizers (byte-level or "
                     "with byte fallback) only. Nothing was written.")


def write_tokenizer(writer, folder: Path, vocab_size: int) -> list[str]:
    """Add the tokenizer keys of `folder` to a GGUFWriter; returns warnings (one line each)."""
    import gguf  # lazy: gguf is needed only to write GGUF files
    from transformers import AutoTokenizer  # lazy: torch-free import of this module

    kind = tokenizer_kind(folder)
    warnings = []
    if kind == "gpt2":
        tok = AutoTokenizer.from_pretrained(str(folder))
        tokens, types = bpe_tokens(tok, vocab_size)
        pre = pre_tokenizer(tok)
        if pre is None:
            pre = "default"
            warnings.append("the tokenizer's pre-tokenizer is not one llama.cpp lists (tokenizer.ggml.pre "
                            "'default'): llama.cpp may split text differently from transformers")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
    else:
        vocab = gguf.LlamaHfVocab(Path(folder))
        tokens, scores, types = [], [], []
        for text, score, kind_ in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind_)
        if len(tokens) > vocab_size:
            raise QLoRAError(f"the tokenizer has {len(tokens)} tokens, the model's embedding {vocab_size} rows; "
                             "give the tokenizer the model was trained with. Nothing was written.")
        for i in range(len(tokens), vocab_size):          # rows the tokenizer does not use
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(folder), n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    return warnings


def bpe_tokens(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """(token strings in id order, token types) of a byte-level BPE tokenizer, `vocab_size` of them
    (llama.cpp's get_vocab_base: added tokens round-tripped through the tokenizer, unused ids `[PADi]`)."""
    import gguf  # lazy: gguf is needed only to write GGUF files
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise QLoRAError(f"the tokenizer has token id {max(vocab.values())}, the model's embedding {vocab_size} rows; "
                         "give the tokenizer the model was trained with. Nothing was written.")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif reverse[i] in added:
            tokens.append(tok.decode(tok.encode(reverse[i], add_special_tokens=False)))
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def pre_tokenizer(tok) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer (the hash of CHECK_TEXT's token ids), or None."""
    ids = tok.encode(CHECK_TEXT)                        # as llama.cpp: with the special tokens it adds
    return PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())
