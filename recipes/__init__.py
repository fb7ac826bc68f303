"""qlora's recipes: one script per task with its YAML config in configs/; installed as `qlora_recipes`.

    qlora train sft                                   # a recipe by name (its configs/sft.yaml)
    qlora train recipes/configs/sft.yaml data=my.jsonl  # or by config file, with key=value overrides
    qlora train --help                                # lists the recipes

| recipe | what it does |
|---|---|
| `sft` | supervised fine-tuning of a causal LM on your chat / instruction data (QLoRA by default) |
| `seq_cls` | sequence classification, full / head / LoRA / QLoRA compared in one table |
| `image_cls` | image classification (small ViT on Fashion-MNIST), the four modes compared |
| `sentiment_prompt` | sentiment *classification* phrased as a prompt for a causal LM (not general SFT) |
| `demo` | the quick start: seq_cls on a subset, the memory profile and a merged export |

Recipe plumbing lives here, not in the library: `config` (YAML + overrides -> dataclasses),
`common` (the four-mode comparison and learning-rate search), `results` (the table writer),
`bundled_data` (readers of the offline data sets), `sft_data` (the SFT data loader).
Also: `dpo` (preference tuning of a causal LM), `causal_lm` (what sft and dpo share), `four_modes` (the
four-mode comparison), `wordnet_chat` (WordNet 3.0 as chat and preference data).
In a source checkout this folder is `recipes/`; `qlora.cli.recipes_package()` imports it as
`qlora_recipes` when the package is not installed. Keep this file free of heavy imports.
"""
