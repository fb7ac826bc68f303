"""The planner on image-text models (qlora.plan.images): the language model's blocks extrapolated from its text
config, the vision tower traced on a budget of images, predicted = measured on CPU within the planner's bounds.

    .venv/bin/python -m pytest -q tests/qlora/plan/test_image_text.py      (~1 min)

Tiny random checkpoints of tests/qlora/arch/test_image_text.py (LLaVA with 4 language-model blocks: extrapolated
from 2 and 3; Gemma 3), one real step measured with memprofile (qlora.plan.sweep) with one image per row.
"""
import pytest
import torch
import transformers

from qlora.arch.multimodal import tower_paths
from qlora.plan import (
    Planner,
    RunSettings,
    build,
    format_plan,
    layer_period,
    loss_fn,
    make_batch,
    num_layers,
    plan,
    with_layers,
)
from qlora.plan.images import add_images
from qlora.plan.sweep import sweep
from tests.qlora.arch.test_image_text import FAMILIES, MORE_FAMILIES
from tests.qlora.plan.test_planner import CATEGORY_BOUND, PEAK_BOUND

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]


def config(family: str, layers: int = 2):
    """The family's tiny config with `layers` language-model blocks (its layer pattern repeated)."""
    kwargs = FAMILIES.get(family) or MORE_FAMILIES[family][0]
    text = dict(kwargs["text_config"], num_hidden_layers=layers)
    if "layer_types" in text:
        text["layer_types"] = (text["layer_types"] * layers)[:layers]
    return transformers.AutoConfig.for_model(family, **dict(kwargs, text_config=text))


def test_the_blocks_are_the_language_models():
    gemma = config("gemma3", layers=6)
    assert (num_layers(gemma), layer_period(gemma)) == (6, 2)
    cut = with_layers(gemma, 4)
    assert cut.text_config.num_hidden_layers == 4 and len(cut.text_config.layer_types) == 4
    assert gemma.text_config.num_hidden_layers == 6                    # the caller's config is not changed
    assert cut.vision_config.num_hidden_layers == gemma.vision_config.num_hidden_layers
    deep, settings = config("llava", layers=4), RunSettings(device="cpu", images=1)
    planner = Planner(deep, settings)
    cut_step, built = planner._step(2, 1, 32), Planner(with_layers(deep, 2), settings)._step(2, 1, 32)
    planner._step(3, 1, 32)
    two, three = (planner._models[(n, None)][1].model.language_model.layers for n in (2, 3))
    assert len(two) == 2 and two[0] is three[0]            # the 2-block model is the 3-block one's first blocks
    assert vars(cut_step) == vars(built)


@pytest.mark.parametrize("family,layers", [("llava", 4), ("gemma3", 2)])
def test_predicted_is_measured_with_an_image(family, layers, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config(family, layers))
    model.save_pretrained(tmp_path / family)
    settings = RunSettings(images=1, device="cpu", compute_dtype="float32")
    rows = sweep(str(tmp_path / family), configurations=("qlora-ckpt", "qlora", "lora"), batches=(2,), seqs=(32,),
                 ranks=(4,), settings=settings, compute_dtype="float32", progress=False)
    for r in rows:
        assert "error" not in r and "predict_error" not in r, r
        for k, measured in r["bytes"].items():
            if k in r["predicted_bytes"] and measured:
                err = abs(r["predicted_bytes"][k] - measured) / measured * 100
                assert err <= (PEAK_BOUND if k == "peak" else CATEGORY_BOUND), (family, r["config"], k, err)
    model, seen = build(config(family, layers), settings), []        # the step's loss runs the tower on the pixels
    model.get_submodule(tower_paths(model)[0]).register_forward_hook(lambda *args: seen.append(1))
    loss_fn(settings)(model, add_images(model, make_batch(model.config, "causal-lm", 1, 32), 1)).backward()
    assert seen
    text = Planner(config(family, layers), RunSettings(device="cpu")).estimate(2, 32)
    with_image = Planner(config(family, layers), RunSettings(device="cpu", images=1)).estimate(2, 32)
    assert with_image.weights_frozen == text.weights_frozen and with_image.peak > text.peak   # pixels, tower


def test_the_plan_shows_the_towers_and_the_images():
    result = plan(config("llava"), 2**30, RunSettings(device="cpu", images=2), seq=64, configurations=("qlora-ckpt",))
    row = result["rows"][0]
    tower = sum(p.numel() * 4 for n, p in transformers.AutoModelForImageTextToText.from_config(config("llava"))
                .named_parameters() if not n.startswith(("model.language_model", "lm_head")))
    assert row["towers"] == tower > 0 and row["images"]["tokens"] == 4 and row["images"]["peak"] > 0
    text = format_plan(result)
    assert "2 image(s) of 8x8 px per sequence, 4 tokens each" in text and "stay in float32" in text
    assert "| qlora-ckpt | 82.25 KiB |" in text and result["note"] is None


@pytest.mark.parametrize("family,seq", [("qwen3_vl", 128), ("qwen3_5_moe", 128), ("mistral3", 128), ("smolvlm", 128),
                                        ("qwen2_5_vl", 128), ("gemma4", 320)])
def test_patch_grid_families_are_planned_with_an_image(family, seq, tmp_path):
    """Towers whose shapes follow from the image's patch grid or the pixels' values (Qwen-VL's and Qwen3.5's grids
    and M-RoPE positions, Qwen2.5-VL's window index built with torch.arange, Pixtral's per-image loop, SmolVLM's
    padding check, Gemma 4's pooling by one_hot of the patch positions): the processor's tensors and the token ids
    are constants of the trace, factories and one_hot of known values too, and the position ids are computed for
    real (memprofile.fake); predicted = measured with one 32-px image per row (Gemma 4 pads every image to its
    processor's budget of 256 tokens)."""
    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(config(family)).save_pretrained(tmp_path / family)
    settings = RunSettings(images=1, image_size=32, device="cpu", compute_dtype="float32")
    rows = sweep(str(tmp_path / family), configurations=("qlora-ckpt",), batches=(2,), seqs=(seq,), ranks=(4,),
                 settings=settings, compute_dtype="float32", progress=False)
    for r in rows:
        assert "error" not in r and "predict_error" not in r, r
        for k, measured in r["bytes"].items():
            if k in r["predicted_bytes"] and measured:
                err = abs(r["predicted_bytes"][k] - measured) / measured * 100
                assert err <= (PEAK_BOUND if k == "peak" else CATEGORY_BOUND), (family, k, err)
    planner = Planner(config(family), settings)
    assert planner.image_tokens() > 0 and planner.estimate(2, seq).peak > 0
    # the pixels' values are known to the trace only where the tower picks by them (they cost the planner real
    # memory and time: a Gemma-3-4B plan with them known for every family took 190 s and 2.6 GB instead of 46 s)
    assert planner._pixels_known == (family in ("smolvlm", "gemma4"))


@pytest.mark.parametrize("family,reason", [("llama4", "its image processor cannot be built here (ImportError")])
def test_images_that_cannot_be_planned_are_one_line_and_the_plan_is_text_only(family, reason):
    result = plan(config(family), 2**30, RunSettings(device="cpu", images=1, loss="model"), seq=64,
                  configurations=("qlora-ckpt",))
    assert reason in result["note"] and result["note"].endswith("planned text only") and "\n" not in result["note"]
    assert result["assumed"].images == 0 and result["rows"][0]["peak_batch1"] > 0
    assert "text only (--images 0)" in format_plan(result)


def test_the_command_plans_an_image_text_config(tmp_path, capsys):
    from qlora.cli import main
    config("llava").save_pretrained(tmp_path)
    common = ["plan", "--model", str(tmp_path / "config.json"), "--memory", "1GiB", "--seq", "64", "--device", "cpu",
              "--configs", "qlora-ckpt"]
    assert main([*common, "--images", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) of 8x8 px per sequence, 4 tokens each (part of seq 64)" in out
    assert "| qlora-ckpt | 82.25 KiB |" in out and "recommendation for qlora" in out
    assert main([*common, "--images", "-1"]) == 2 and "--images" in capsys.readouterr().err


@pytest.mark.parametrize("configuration,label", [("qlora", "forward of block 7 (model.language_model.layers.7)"),
                                                 ("qlora-ckpt", "backward of block 1 (model.language_model.layers.1)")])
def test_the_peaks_block_is_named_in_the_whole_language_model(configuration, label):
    """An 8-block language model is traced with 2 and 3 blocks beside its whole vision tower: the peak's block is
    numbered in the language model of 8 (the last block's forward without checkpointing), never counted across the
    tower's blocks too (a real-size Qwen3-VL read "block 65 (model.language_model.layers.65)" of 36)."""
    settings = RunSettings(device="cpu", images=1).with_configuration(configuration)
    assert Planner(config("gemma3", 8), settings).estimate(2, 64).peak_phase.startswith(label)
