"""The offline image-text default (qlora_recipes.image_chat_default), with a tiny ViT and a tiny random Llama over
SmolLM2's tokenizer instead of the real ones (seconds, not minutes): the built folder loads in stock transformers
and its processor renders the image tokens the model expects; the data rows point at the photos they name; the
batched, cached held-out scoring equals a brute-force one.

    .venv/bin/python -m pytest -q tests/recipes/test_image_chat_default.py
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration, ViTModel

from qlora.errors import QLoRAError
from qlora_recipes import image_chat_default as icd
from qlora_recipes.bundled_data import fashion_mnist, fashion_mnist_dir
from qlora_recipes.image_cls import PretrainConfig

TINY_ENCODER = PretrainConfig(classes=list(range(10)), train_size=64, test_size=16, epochs=1, hidden_size=16,
                              intermediate_size=32, num_layers=1, num_heads=2, patch_size=7)


@pytest.fixture(scope="module")
def built(tmp_path_factory, smol_tok_dir):
    """(folder of the default model built over a tiny LM and a tiny ViT, data folder with 20 + 10 rows)."""
    try:
        fashion_mnist_dir()
    except QLoRAError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("image-chat")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      pad_token_id=2, bos_token_id=1, eos_token_id=2))
    lm.save_pretrained(str(root / "lm"))
    for p in smol_tok_dir.iterdir():
        shutil.copy(p, root / "lm" / p.name)
    folder = icd.build_default_model(root / "cache", encoder=TINY_ENCODER, language_model=str(root / "lm"))
    icd.write_default_data(root / "data", n_train=20, n_eval=10, seed=0)
    return folder, root


def test_folder_loads_in_stock_transformers_and_renders_image_tokens(built, monkeypatch):
    folder, root = built
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    # 28x28 at patch 7: 16 image tokens, the image token is the one added to the tokenizer, and the template
    # loads the photo from its path
    Image.fromarray(np.full((28, 28), 128, np.uint8), mode="L").save(root / "grey.png")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(root / "grey.png")},
                                             {"type": "text", "text": icd.QUESTION}]}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(icd.IMAGE_TOKEN) == 49152
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 16
    assert model(**batch).logits.shape == (1, batch["input_ids"].shape[1], 49153)
    # the vision tower is the pretrained grey ViT: on a grey photo (RGB, equal channels) its features equal the ViT's
    vit = ViTModel.from_pretrained(str(next((root / "cache").glob("fmnist-vit-pretrained-*"))), add_pooling_layer=False)
    grey = batch["pixel_values"][:, :1]
    expected = vit(grey.to(torch.bfloat16).float(), output_hidden_states=True).hidden_states[-1]
    got = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)   # the folder holds bf16 weights
    # built once: a second call with the same settings returns the cached folder without assembling
    monkeypatch.setattr(icd, "assemble", lambda *a: pytest.fail("assembled again although cached"))
    assert icd.build_default_model(root / "cache", encoder=TINY_ENCODER, language_model=str(root / "lm")) == folder


def test_data_rows_reference_existing_photos(built):
    _, root = built
    images, labels = fashion_mnist("test")
    for split, n in (("train", 20), ("eval", 10)):
        lines = (root / "data" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        seen = []
        for line in lines:
            user, assistant = json.loads(line)["messages"]
            image, text = user["content"]
            assert image["type"] == "image" and text == {"type": "text", "text": icd.QUESTION}
            assert not image["path"].startswith("/") and (root / "data" / image["path"]).is_file()
            seen.append(icd.ANSWERS.index(assistant["content"]))
            if split == "eval":       # held-out photos are the test split's, pixel for pixel, with their label
                i = int(image["path"].split("/")[-1].split(".")[0])
                assert np.array_equal(np.array(Image.open(root / "data" / image["path"])), images[i].numpy())
                assert seen[-1] == int(labels[i])
        assert sorted(set(seen)) == list(range(10)) and max(map(seen.count, range(10))) == n // 10


def test_heldout_accuracy_equals_brute_force(built):
    folder, root = built
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    rows = icd.read_rows(root / "data" / "eval.jsonl")[:2]
    reference = torch.empty(2, len(icd.ANSWERS))
    with torch.no_grad():
        for i, row in enumerate(rows):
            prompt = processor.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
            image = Image.open(row["messages"][0]["content"][0]["path"])
            n_prompt = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
            for j, answer in enumerate(icd.ANSWERS):
                full = processor.apply_chat_template(row["messages"][:-1] + [{"role": "assistant", "content": answer}],
                                                     tokenize=False)
                batch = processor(text=[full], images=[image], return_tensors="pt")
                logp = model(**batch).logits[0, :-1].float().log_softmax(-1)
                ids = batch["input_ids"][0, 1:]
                reference[i, j] = sum(logp[t, ids[t]] for t in range(n_prompt - 1, len(ids)))
    scores = icd.answer_scores(model, processor, rows, batch_size=2)
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-5)
    truth = torch.tensor([icd.ANSWERS.index(r["messages"][-1]["content"]) for r in rows])
    assert icd.heldout_accuracy(model, processor, rows) == (reference.argmax(-1) == truth).float().mean().item()
