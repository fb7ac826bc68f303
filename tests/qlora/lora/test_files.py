"""Adapter files in PEFT's format, checked against PEFT itself (both directions) and bad folders.

qlora -> PEFT: qlora.save_adapter, then peft.PeftModel.from_pretrained(base, folder).
PEFT -> qlora: peft.get_peft_model(...).save_pretrained(folder), then qlora.load_adapter(base, folder).
Both must give the same logits as the model that wrote the folder (fp32, 1e-5). Adapters are
randomised before saving: a fresh adapter (B = 0) would match even if nothing were loaded.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import qlora
from qlora import LoraConfig, QLoRAError, add_lora, load_adapter, read_adapter_config, save_adapter
from qlora.lora.inject import lora_layers
from qlora.lora.layers import LoRAEmbedding, LoRALayer, ModulesToSave

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

ATOL = 1e-5
PREFIX = "base_model.model."


def _randomise_trainable(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _snapshot(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            getattr(model, "qlora_config", None))


def _assert_unchanged(model, snap):
    modules, state, grads, cfg = snap
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert getattr(model, "qlora_config", None) is cfg


def _logits(model, x):
    key = "pixel_values" if x.is_floating_point() else "input_ids"
    with torch.no_grad():
        return model(**{key: x}).logits


# name -> (fixture, factory kwargs, input fixture, target_modules, modules_to_save, use_rslora)
CASES = {
    "llama_seq_cls": ("tiny_llama", dict(seq_cls=True), "token_ids", ["q_proj", "v_proj", "embed_tokens"],
                      ["score"], False),
    "bert_seq_cls": ("tiny_bert_cls", {}, "token_ids", ["query", "value", "dense", "word_embeddings"],
                     ["classifier"], False),
    "llama_lm_all_linear_rslora": ("tiny_llama", {}, "token_ids", "all-linear", None, True),
    "vit_conv": ("tiny_vit", {}, "pixel_values", ["q_proj", "v_proj", "patch_embeddings.projection"],
                 ["classifier"], False),
}


@pytest.fixture(params=list(CASES))
def case(request):
    fixture, kwargs, inputs, targets, to_save, rslora = CASES[request.param]
    factory = request.getfixturevalue(fixture)
    return dict(name=request.param, make=lambda: factory(**kwargs), x=request.getfixturevalue(inputs),
                targets=targets, to_save=to_save, rslora=rslora)


def test_qlora_adapter_loads_in_peft(case, tmp_path):
    make, x = case["make"], case["x"]
    base_out = _logits(make(), x)
    model = make()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, use_rslora=case["rslora"], target_modules=case["targets"],
                               modules_to_save=case["to_save"]))
    _randomise_trainable(model)
    ours = _logits(model, x)
    assert (ours - base_out).abs().max() > 1e-2
    save_adapter(model, tmp_path)

    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(pm, x), ours, atol=ATOL, rtol=0)
    # PEFT adapted exactly the modules we did
    peft_adapted = {n.removeprefix(PREFIX) for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_adapted == set(lora_layers(model))
    assert pm.peft_config["default"].use_rslora is case["rslora"]


def test_peft_adapter_loads_in_qlora(case, tmp_path):
    make, x = case["make"], case["x"]
    base_out = _logits(make(), x)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=case["rslora"], target_modules=case["targets"],
                           modules_to_save=case["to_save"])
    pm = peft.get_peft_model(make(), pcfg)
    _randomise_trainable(pm)                     # lora_A, lora_B, lora_embedding_*, modules_to_save copies
    pm.eval()
    ref = _logits(pm, x)
    assert (ref - base_out).abs().max() > 1e-2
    pm.save_pretrained(str(tmp_path))

    model = load_adapter(make(), tmp_path)
    torch.testing.assert_close(_logits(model, x), ref, atol=ATOL, rtol=0)
    peft_adapted = {n.removeprefix(PREFIX) for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(lora_layers(model)) == peft_adapted
    assert model.qlora_config.use_rslora is case["rslora"]
    # every loaded tensor equals PEFT's
    peft_sd = {k.replace(".default", ""): v for k, v in pm.state_dict().items()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, peft_sd[f"{PREFIX}{name}"]), name


def test_qlora_round_trip_and_dtype(tiny_llama, token_ids, tmp_path):
    model = tiny_llama(seq_cls=True)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                               modules_to_save=["score"], use_rslora=True))
    _randomise_trainable(model)
    ref = _logits(model, token_ids)
    save_adapter(model, tmp_path)
    again = load_adapter(tiny_llama(seq_cls=True), tmp_path)
    assert torch.equal(_logits(again, token_ids), ref)
    assert qlora.count_parameters(again) == qlora.count_parameters(model)
    bf16 = load_adapter(tiny_llama(seq_cls=True), tmp_path, dtype="bfloat16")
    assert bf16.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.bfloat16
    assert bf16.model.embed_tokens.lora_embedding_B.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(bf16, token_ids), ref, atol=5e-2, rtol=5e-2)


def test_older_peft_key_names(tiny_bert_cls, token_ids, tmp_path):
    """Older PEFT files keep the adapter name: `.lora_A.default.weight`, `.modules_to_save.default.<param>`."""
    model = tiny_bert_cls()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "word_embeddings"],
                               modules_to_save=["classifier"]))
    _randomise_trainable(model)
    ref = _logits(model, token_ids)
    save_adapter(model, tmp_path)

    def old_names(t):
        for k in list(t):
            if ".lora_A." in k or ".lora_B." in k:
                t[k.replace(".weight", ".default.weight")] = t.pop(k)
            elif k.endswith(("lora_embedding_A", "lora_embedding_B")):
                t[k + ".default"] = t.pop(k)
            elif k.startswith(f"{PREFIX}classifier."):
                t[k.replace("classifier.", "classifier.modules_to_save.default.")] = t.pop(k)
    _rewrite(tmp_path, old_names)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert f"{PREFIX}classifier.modules_to_save.default.weight" in keys
    assert f"{PREFIX}bert.embeddings.word_embeddings.lora_embedding_A.default" in keys
    loaded = load_adapter(tiny_bert_cls(), tmp_path)
    assert torch.equal(_logits(loaded, token_ids), ref)


# ---------------------------------------------------------------- file contents

def test_adapter_config_and_keys(tiny_bert_cls, tmp_path):
    model = tiny_bert_cls()
    targets = ["query", "value", "word_embeddings"]
    plain_modules = dict(tiny_bert_cls().named_modules())
    add_lora(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=targets,
                               modules_to_save=["classifier"]))
    _randomise_trainable(model)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "qlora_adapter.json"]

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["lora_dropout"] == 0.1
    assert cfg["use_rslora"] is True
    assert cfg["target_modules"] == targets
    assert cfg["modules_to_save"] == ["classifier"]
    assert cfg["bias"] == "none"
    # PEFT reads the same file back into the same settings
    pcfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert (pcfg.r, pcfg.lora_alpha, pcfg.use_rslora) == (4, 16, True)
    assert set(pcfg.target_modules) == set(targets) and list(pcfg.modules_to_save) == ["classifier"]

    expected = {}
    for name, m in plain_modules.items():
        if name and any(name == t or name.endswith("." + t) for t in targets):
            if isinstance(m, nn.Embedding):
                expected[f"{PREFIX}{name}.lora_embedding_A"] = (4, m.num_embeddings)
                expected[f"{PREFIX}{name}.lora_embedding_B"] = (m.embedding_dim, 4)
            else:
                expected[f"{PREFIX}{name}.lora_A.weight"] = (4, m.in_features)
                expected[f"{PREFIX}{name}.lora_B.weight"] = (m.out_features, 4)
    expected[f"{PREFIX}classifier.weight"] = tuple(plain_modules["classifier"].weight.shape)
    expected[f"{PREFIX}classifier.bias"] = tuple(plain_modules["classifier"].bias.shape)
    assert len(expected) == 2 * 2 * 2 + 2 + 2     # q, v in 2 layers; word_embeddings; classifier w, b

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert tensors[f"{PREFIX}classifier.weight"].equal(model.classifier.modules_to_save.weight)
    emb = model.bert.embeddings.word_embeddings
    assert tensors[f"{PREFIX}bert.embeddings.word_embeddings.lora_embedding_B"].equal(emb.lora_embedding_B)
    q = model.bert.encoder.layer[1].attention.self.query
    assert tensors[f"{PREFIX}bert.encoder.layer.1.attention.self.query.lora_A.weight"].equal(q.lora_A.weight)
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_save_without_adapters_refused(tiny_llama, tmp_path):
    with pytest.raises(QLoRAError, match="add_lora"):
        save_adapter(tiny_llama(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad folders: clear error, model unchanged

@pytest.fixture
def saved_llama(tiny_llama, tmp_path):
    """An adapter folder written by qlora for tiny_llama (q_proj, v_proj, embed_tokens)."""
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    _randomise_trainable(model)
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    return folder


def _rewrite(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _refused(model, folder, match):
    snap = _snapshot(model)
    with pytest.raises(QLoRAError, match=match) as e:
        load_adapter(model, folder)
    _assert_unchanged(model, snap)
    assert not any(isinstance(m, (LoRALayer, ModulesToSave)) for m in model.modules())
    return str(e.value)


def test_shape_mismatch_names_the_key(tiny_llama, saved_llama):
    bad = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_A.weight"
    _rewrite(saved_llama, lambda t: t.__setitem__(bad, torch.zeros(5, 32)))
    msg = _refused(tiny_llama(), saved_llama, "shape")
    assert "'model.layers.1.self_attn.v_proj.lora_A.weight'" in msg
    assert "(5, 32)" in msg and "(4, 32)" in msg and "left as it was" in msg


def test_other_model_size_refused(tiny_llama, saved_llama):
    bigger = tiny_llama(hidden_size=48, intermediate_size=96)
    with safe_open(str(saved_llama / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    file_shapes = {}
    with safe_open(str(saved_llama / "adapter_model.safetensors"), "pt") as f:
        for k in keys:
            file_shapes[k] = tuple(f.get_slice(k).get_shape())
    modules = dict(bigger.named_modules())

    def needed(key):          # the shape `bigger` needs for this key, by the LoRA formulas
        path, _, kind = key.removeprefix(PREFIX).partition(".lora_")
        m = modules[path]
        return {"embedding_A": (4, m.num_embeddings), "embedding_B": (m.embedding_dim, 4),
                "A.weight": (4, getattr(m, "in_features", None)),
                "B.weight": (getattr(m, "out_features", None), 4)}[kind]
    first_bad = next(k for k in keys if file_shapes[k] != needed(k)).removeprefix(PREFIX)
    assert first_bad == "model.embed_tokens.lora_embedding_B"     # lora_embedding_A is (r, vocab): fits
    msg = _refused(bigger, saved_llama, "shape")
    assert f"'{first_bad}'" in msg


def test_unknown_module_names_the_key(tiny_llama, saved_llama):
    extra = f"{PREFIX}model.layers.7.self_attn.q_proj.lora_A.weight"      # the model has 2 layers
    _rewrite(saved_llama, lambda t: t.__setitem__(extra, torch.zeros(4, 32)))
    msg = _refused(tiny_llama(), saved_llama, "no matching module")
    assert "'model.layers.7.self_attn.q_proj.lora_A.weight'" in msg


def test_missing_key_named(tiny_llama, saved_llama):
    gone = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    _rewrite(saved_llama, lambda t: t.pop(gone))
    msg = _refused(tiny_llama(), saved_llama, "lacks")
    assert "'model.layers.0.self_attn.q_proj.lora_B.weight'" in msg


def test_adapter_of_another_architecture(tiny_bert_cls, saved_llama):
    msg = _refused(tiny_bert_cls(), saved_llama, "matches no module")
    assert "q_proj" in msg


def test_missing_weights_file(tiny_llama, saved_llama):
    (saved_llama / "adapter_model.safetensors").unlink()
    _refused(tiny_llama(), saved_llama, "has no adapter_model.safetensors")


@pytest.mark.parametrize("content", [b"garbage bytes, not a safetensors file" * 10, b"", b"\xff" * 8 + b"{}"])
def test_corrupt_weights_file(tiny_llama, saved_llama, content):
    (saved_llama / "adapter_model.safetensors").write_bytes(content)
    _refused(tiny_llama(), saved_llama, "corrupt")


def test_truncated_weights_file(tiny_llama, saved_llama):
    path = saved_llama / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    _refused(tiny_llama(), saved_llama, "corrupt")


class _Marker:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_bin_refused_without_unpickling(tiny_llama, saved_llama, monkeypatch, tmp_path):
    (saved_llama / "adapter_model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    with open(saved_llama / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Marker(marker)}, f)

    def no_unpickling(*a, **k):
        raise AssertionError("load_adapter must not unpickle")
    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    msg = _refused(tiny_llama(), saved_llama, "adapter_model.bin")
    assert "never unpickles" in msg
    assert not marker.exists()


@pytest.mark.parametrize("edit,match", [
    (lambda c: "{not json", "not valid JSON"),
    (lambda c: json.dumps({**c, "peft_type": "IA3"}), "IA3"),
    (lambda c: json.dumps({**c, "use_dora": True}), "use_dora"),
    (lambda c: json.dumps({**c, "bias": "all"}), "bias"),
    (lambda c: json.dumps({**c, "rank_pattern": {"q_proj": 0}}), r"rank_pattern\['q_proj'\]=0: must be an integer"),
    (lambda c: json.dumps({**c, "rank_pattern": {"q_proj": 8}}), "q_proj"),       # the file holds rank 4 there
    (lambda c: json.dumps({**c, "r": 0}), "r=0"),
    (lambda c: json.dumps({**c, "target_modules": ["q_prj"]}), "q_proj"),
])
def test_bad_config_file(tiny_llama, saved_llama, edit, match):
    path = saved_llama / "adapter_config.json"
    path.write_text(edit(json.loads(path.read_text())))
    _refused(tiny_llama(), saved_llama, match)


def test_missing_folder_or_config(tiny_llama, saved_llama, tmp_path):
    _refused(tiny_llama(), tmp_path / "nowhere", "does not exist")
    (saved_llama / "adapter_config.json").unlink()
    _refused(tiny_llama(), saved_llama, "adapter_config.json")


def test_load_into_model_with_adapters_refused(tiny_llama, saved_llama):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    snap = _snapshot(model)
    with pytest.raises(QLoRAError, match="already has LoRA adapters"):
        load_adapter(model, saved_llama)
    _assert_unchanged(model, snap)


def test_peft_embedding_base_weights_loaded(tiny_llama, token_ids, tmp_path):
    """PEFT saves a targeted embed_tokens' full table (save_embedding_layers='auto') and loads it
    into the base layer; qlora does the same, so a changed table is not silently dropped."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"]))
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    assert f"{PREFIX}model.embed_tokens.base_layer.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    ref = _logits(pm.eval(), token_ids)
    model = load_adapter(tiny_llama(), tmp_path)
    assert isinstance(model.model.embed_tokens, LoRAEmbedding)
    torch.testing.assert_close(_logits(model, token_ids), ref, atol=ATOL, rtol=0)
    # a PEFT-saved table of the wrong size is refused like any other shape mismatch
    other = tiny_llama(vocab_size=100)
    snap = _snapshot(other)
    with pytest.raises(QLoRAError, match="embed_tokens"):
        load_adapter(other, tmp_path)
    _assert_unchanged(other, snap)


def _load_messages(load) -> list[str]:
    """Every warning and log record (PEFT, transformers) emitted while `load()` runs."""
    import logging
    import warnings
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
    finally:
        root.removeHandler(handler)
    return records + [str(w.message) for w in caught]


def test_adapter_config_holds_peft_fields_only_and_old_adapters_still_load(tiny_llama, token_ids, tmp_path):
    model = qlora.add_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise_trainable(model)
    new = tmp_path / "new"
    save_adapter(model, new)
    cfg = json.loads((new / "adapter_config.json").read_text())
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(cfg) - known == set()                        # nothing PEFT does not know
    facts = json.loads((new / "qlora_adapter.json").read_text())
    assert facts["architecture"] == "LlamaForCausalLM"
    assert read_adapter_config(new).qlora == facts

    # the layout before the split: our facts as a `qlora` section inside adapter_config.json
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text(json.dumps({**cfg, "qlora": facts}))
    shutil.copy(new / "adapter_model.safetensors", old)
    assert read_adapter_config(old).qlora == facts
    reloaded = load_adapter(tiny_llama(), old)
    torch.testing.assert_close(_logits(reloaded, token_ids), _logits(model, token_ids), atol=ATOL, rtol=0)

    # PEFT warned "upgrade the PEFT version" on the old layout; on the new one it says nothing
    said_old = _load_messages(lambda: peft.PeftModel.from_pretrained(tiny_llama(), str(old)))
    said_new = _load_messages(lambda: peft.PeftModel.from_pretrained(tiny_llama(), str(new)))
    assert any("upgrade" in m.lower() for m in said_old), said_old
    assert not any("upgrade" in m.lower() for m in said_new), said_new


def test_per_module_ranks_and_alphas_load_in_peft(tiny_llama, tmp_path):
    """rank_pattern / alpha_pattern (PEFT's fields and matching rule): q_proj at r=8, alpha 4, the rest r=2."""
    from peft import PeftModel
    torch.manual_seed(0)
    model = add_lora(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              rank_pattern={"q_proj": 8}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 16},
                                              init_lora_weights=False))
    layers = qlora.lora.lora_layers(model)
    assert {n: (m.r, m.lora_alpha) for n, m in layers.items() if "layers.1" in n} == {
        "model.layers.1.self_attn.q_proj": (8, 16), "model.layers.1.self_attn.v_proj": (2, 4)}
    save_adapter(model, tmp_path / "a")
    peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, peft(ids).logits, rtol=0, atol=1e-5)


def test_a_pattern_that_is_not_a_regex_is_one_line():
    with pytest.raises(QLoRAError, match=r"rank_pattern key 'q_proj\[' is not a regular expression"):
        LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj[": 8})
