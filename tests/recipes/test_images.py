"""The SFT and DPO recipes on chat rows with images: `qlora train sft model=FOLDER data=rows.jsonl`, end to end on a tiny
image-text model built offline (tests/qlora/data/tiny_vlm.py), and its bad input on the command line.

    .venv/bin/python -m pytest -q tests/recipes/test_images.py      (~60 s)

Rows with pictures (paths relative to the data file, one and two per row) and text-only rows train together; the
adapters move; samples are generated from the pictures. DPO: pairs whose prompts hold
pictures, mixed with text pairs. Bad input is one line, exit 2, nothing written.
"""
import importlib.util
import json

import pytest
from safetensors.torch import load_file

from qlora.cli import main
from qlora.data import images
from tests.qlora.data.test_sft import write
from tests.qlora.data.tiny_vlm import processor_for, save_tiny_vlm, write_pictures

pytestmark = pytest.mark.usefixtures("single_thread")
ARGS = ["train.batch_size=2", "train.max_steps=3", "train.progress=false", "samples=2", "max_new_tokens=3", "lora.r=4"]


def chat(*names, answer="A cat."):
    return {"messages": [{"role": "user", "content": [*({"type": "image", "path": n} for n in names),
                                                       {"type": "text", "text": "What is this?"}]},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_pictures(folder, {"a.png": (32, 32), "b.png": (16, 48)})
    text = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    return write(folder / "rows.jsonl", [chat("a.png"), chat("a.png", "b.png", answer="Two things."), text] * 3)


@pytest.mark.parametrize("family, mode", [("llava", "lora"), ("gemma3", "lora"), ("llava", "qlora"),
                                          ("qwen3_vl", "qlora")])
def test_sft_with_images_end_to_end(tmp_path, smol_tok_dir, data, family, mode, capsys, monkeypatch):
    """Qwen3-VL: pictures of any size (image_grid_thw, a [patches, 384] pixel_values of each batch's pictures
    concatenated, mm_token_type_ids); its processor is handed over (its folder's needs torchvision here)."""
    model = save_tiny_vlm(family, tmp_path / family, smol_tok_dir)
    if family == "qwen3_vl":
        monkeypatch.setattr(images, "load_processor", lambda path: processor_for(family, smol_tok_dir))
    out = tmp_path / "run"
    assert main(["train", "sft", f"model={model}", f"data={data}", f"out_dir={out}", "eval_fraction=0.34",
                 f"mode={mode}", *ARGS]) == 0
    said = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["data_stats"]
    assert summary["steps"] == 3 and stats["train"]["images"] + stats["eval"]["images"] == 6
    assert stats["train"]["kept"] + stats["eval"]["kept"] == 9 and "with images" in said
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())   # it trained
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and summary["eval_after"]["loss"] > 0


def test_bad_image_input_exits_2_and_writes_nothing(tmp_path, smol_tok_dir, data, tiny_chat_model, capsys):
    vlm = save_tiny_vlm("llava", tmp_path / "llava", smol_tok_dir)
    missing = write(tmp_path / "missing.jsonl", [chat("nowhere.png")] * 4)
    broken = data.parent / "broken.png"
    broken.write_bytes(b"not a picture")
    unreadable = write(data.parent / "broken.jsonl", [chat("a.png"), chat("broken.png")] * 2)
    cases = [(vlm, missing, ["missing.jsonl:", "nowhere.png", "not found"]),
             (vlm, unreadable, ["broken.jsonl:", "cannot read the image 'broken.png'"]),
             (tiny_chat_model, data, ["rows.jsonl:", "no image processor", "image-text model"])]
    if importlib.util.find_spec("torchvision") is None:      # Qwen3-VL's processor needs it in transformers 5
        qwen = save_tiny_vlm("qwen3_vl", tmp_path / "qwen3_vl", smol_tok_dir)
        cases.append((qwen, data, ["Qwen3VLVideoProcessor requires the Torchvision library", "pip install torchvision"]))
    capsys.readouterr()                                 # the test's own saving
    for model, rows, words in cases:
        out = tmp_path / "never-written"
        assert main(["train", "sft", f"model={model}", f"data={rows}", f"out_dir={out}", *ARGS]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert all(w in err for w in words), (words, err)
        assert not out.exists()


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_dpo_with_image_prompts_end_to_end(tmp_path, smol_tok_dir, precompute_ref):
    model = save_tiny_vlm("llava", tmp_path / "llava", smol_tok_dir)
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_pictures(folder, {"a.png": (32, 32), "b.png": (16, 48)})
    pair = {"prompt": chat("a.png")["messages"][:1], "chosen": "A cat.", "rejected": "A dog."}
    two = {"prompt": chat("a.png", "b.png")["messages"][:1], "chosen": "Two things.", "rejected": "Nothing."}
    text = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Go away."}
    data = write(folder / "pairs.jsonl", [pair, two, text] * 3)
    out = tmp_path / "dpo"
    assert main(["train", "dpo", f"model={model}", f"data={data}", f"out_dir={out}", "eval_fraction=0.34",
                 "mode=lora", f"precompute_ref={str(precompute_ref).lower()}", *ARGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data_stats"]["train"]["kept"] == 6
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
