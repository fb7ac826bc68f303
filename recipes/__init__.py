"""qlora's recipes: one script per task with its YAML config in configs/; installed as `qlora_recipes`.

    qlora train sft                                   # a recipe by name (its configs/sft.yaml)
    qlora train recipes/configs/sft.yaml data=my.jsonl  # or by config file, with key=value overrides
    qlora train --help                                # lists the recipes

| recipe | what it does |
|---|---|
| `sft` | supervised fine-tuning of a causal LM on your chat / instruction data (QLoRA by default) |
| `dpo` | preference tuning (DPO, IPO, SimPO, ...) of a causal LM on pairs of responses, one 4-bit base |
| `grpo` | online RL with verifiable rewards (GRPO, Dr. GRPO, DAPO): the policy samples, rewards score (in progress) |
| `seq_cls` | sequence classification, full / head / LoRA / QLoRA compared in one table |
| `image_cls` | image classification (small ViT on Fashion-MNIST), the four modes compared |
| `sentiment_prompt` | sentiment *classification* phrased as a prompt for a causal LM (not general SFT) |
| `demo` | the quick start: seq_cls on a subset, the memory profile and a merged export |

A recipe is a config dataclass, its own choices and calls into the library (the data loaders are
qlora.data, the loop qlora.train). What the recipes share: `config` (`RecipeConfig`, the one config base),
`causal_lm` (what sft and dpo share: their keys, model build, samples, the end of a run), `four_modes` (the
four-mode comparison and learning-rate search), `results` (the table writer), `bundled_data` (readers of
the offline data sets), `wordnet_chat` (WordNet 3.0 as chat and preference data), `grpo_rewards` (GRPO's
reward functions: built in, or the user's file.py:function), `image_chat_default` (the offline image-text
default: a LLaVA-style model built here from a Fashion-MNIST ViT and SmolLM2, photo chat rows, the held-out
accuracy).
pyproject.toml maps this folder (recipes/) to the package `qlora_recipes`; `qlora train` finds it by name.
Keep this file free of heavy imports.
"""
