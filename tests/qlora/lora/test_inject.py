"""add_lora / find_targets / counting / merge / unmerge / unload / disable_adapters on real HF models.

Models are tiny transformers models built from configs (tests/conftest.py); trainable-parameter
counts are compared with the formulas r·(in+out), r·(num_embeddings+embedding_dim) and
r·(in·kh·kw+out) summed here over the modules the test itself selects.
"""
from __future__ import annotations

import ast
import copy
import re

import pytest
import torch
from torch import nn

import qlora
from qlora import (
    LoraConfig,
    LoRAConv2d,
    LoRAEmbedding,
    LoRALinear,
    QLoRAError,
    add_lora,
    count_parameters,
    disable_adapters,
    merge_lora,
    print_trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from qlora.lora.inject import find_targets
from qlora.lora.layers import LoRALayer, ModulesToSave

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5


def _randomise_adapters(model, seed=0, scale=0.3):
    """Give every adapter (and modules_to_save copy) non-zero, seeded values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _suffix_match(name, suffixes):
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _expected_lora_params(model, r, select) -> int:
    """Sum of the LoRA formulas over the modules of the *plain* model for which select(name, module)."""
    total = 0
    for name, m in model.named_modules():
        if not name or not select(name, m):
            continue
        if isinstance(m, nn.Embedding):
            total += r * (m.num_embeddings + m.embedding_dim)
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += r * (m.in_channels * kh * kw + m.out_channels)
        elif isinstance(m, nn.Linear):
            total += r * (m.in_features + m.out_features)
        else:
            raise AssertionError(f"test selected an unsupported module {name}")
    return total


def _snapshot(model):
    """Everything a failed call must leave as it was: keys, module types, values, grad flags."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        getattr(model, "qlora_config", None),
    )


def _assert_unchanged(model, snap):
    modules, state, grads, cfg = snap
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v) or torch.allclose(now[k], v, atol=0, rtol=0, equal_nan=True), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert getattr(model, "qlora_config", None) is cfg


# ---------------------------------------------------------------- fresh adapters

def test_fresh_adapters_change_nothing_llama(tiny_llama, token_ids):
    model = tiny_llama()
    before = model(token_ids).logits
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert torch.equal(model(token_ids).logits, before)


def test_fresh_adapters_change_nothing_bert(tiny_bert_cls, token_ids):
    model = tiny_bert_cls()
    before = model(token_ids).logits
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"],
                               modules_to_save=["classifier"]))
    assert isinstance(model.bert.embeddings.word_embeddings, LoRAEmbedding)
    assert torch.equal(model(token_ids).logits, before)


def test_fresh_adapters_change_nothing_vit(tiny_vit, pixel_values):
    model = tiny_vit()
    before = model(pixel_values).logits
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "patch_embeddings.projection"]))
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, LoRAConv2d)
    assert torch.equal(model(pixel_values).logits, before)


# ---------------------------------------------------------------- merge / unmerge / disable

def _adapted_llama(tiny_llama):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]))
    _randomise_adapters(model)
    return model


def _base_weights(model):
    return {n: l.base_layer.weight.detach().clone() for n, l in model.named_modules() if isinstance(l, LoRALayer)}


def test_merge_unmerge_outputs_and_weights(tiny_llama, token_ids):
    plain = tiny_llama()
    model = _adapted_llama(tiny_llama)
    base_out = plain(token_ids).logits
    adapted = model(token_ids).logits
    assert (adapted - base_out).abs().max() > 1e-2        # the randomised adapters matter
    w0 = _base_weights(model)

    merge_lora(model)
    assert all(l.merged for l in qlora.lora.inject.lora_layers(model).values())
    torch.testing.assert_close(model(token_ids).logits, adapted, atol=ATOL, rtol=0)
    w_once = _base_weights(model)
    assert any(not torch.equal(w_once[k], w0[k]) for k in w0)
    merge_lora(model)                                      # merging twice == merging once
    for k, v in _base_weights(model).items():
        assert torch.equal(v, w_once[k]), k
    torch.testing.assert_close(model(token_ids).logits, adapted, atol=ATOL, rtol=0)

    unmerge_lora(model)
    for k, v in _base_weights(model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)
    unmerge_lora(model)                                    # idempotent as well
    for k, v in _base_weights(model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(token_ids).logits, adapted, atol=ATOL, rtol=0)


def test_merge_matches_on_bert_and_vit(tiny_bert_cls, tiny_vit, token_ids, pixel_values):
    for model, x, targets in [
        (tiny_bert_cls(), token_ids, ["query", "key", "value", "dense", "word_embeddings"]),
        (tiny_vit(), pixel_values, ["q_proj", "v_proj", "mlp.fc1", "patch_embeddings.projection"]),
    ]:
        add_lora(model, LoraConfig(r=3, lora_alpha=6, target_modules=targets, modules_to_save=["classifier"]))
        _randomise_adapters(model)
        adapted = model(x).logits
        merge_lora(model)
        torch.testing.assert_close(model(x).logits, adapted, atol=ATOL, rtol=0)
        unmerge_lora(model)
        torch.testing.assert_close(model(x).logits, adapted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_gives_base_output(tiny_bert_cls, token_ids, merged):
    plain = tiny_bert_cls()
    base_out = plain(token_ids).logits
    model = tiny_bert_cls()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"],
                               modules_to_save=["classifier"]))
    _randomise_adapters(model)
    adapted = model(token_ids).logits
    assert (adapted - base_out).abs().max() > 1e-2
    if merged:
        merge_lora(model)
    with disable_adapters(model) as m:
        assert m is model
        inside = model(token_ids).logits
    if merged:
        torch.testing.assert_close(inside, base_out, atol=ATOL, rtol=0)
        assert all(l.merged for l in qlora.lora.inject.lora_layers(model).values())
    else:
        assert torch.equal(inside, base_out)
    torch.testing.assert_close(model(token_ids).logits, adapted, atol=ATOL, rtol=0)


def test_disable_adapters_restores_after_exception(tiny_llama, token_ids):
    model = _adapted_llama(tiny_llama)
    adapted = model(token_ids).logits
    with pytest.raises(RuntimeError):
        with disable_adapters(model):
            raise RuntimeError("boom")
    assert torch.equal(model(token_ids).logits, adapted)


def test_merge_refuses_non_finite_and_changes_nothing(tiny_llama, token_ids):
    model = _adapted_llama(tiny_llama)
    layers = qlora.lora.inject.lora_layers(model)
    bad_path = "model.layers.1.self_attn.v_proj"          # not the first adapted layer
    with torch.no_grad():
        layers[bad_path].lora_B.weight.fill_(float("inf"))
    w0 = _base_weights(model)
    with pytest.raises(QLoRAError, match="non-finite"):
        merge_lora(model)
    assert torch.equal(layers[bad_path].base_layer.weight, w0[bad_path])
    assert not layers[bad_path].merged
    # the whole model is left as it was: no layer merged, no weight changed
    assert not any(l.merged for l in layers.values())
    for k, v in _base_weights(model).items():
        assert torch.equal(v, w0[k]), k
    with torch.no_grad():
        layers[bad_path].lora_B.weight.zero_()
    assert torch.isfinite(model(token_ids).logits).all()


def test_unload_refuses_non_finite_and_changes_nothing(tiny_llama):
    model = _adapted_llama(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_B.weight.fill_(float("nan"))
    snap = _snapshot(model)
    with pytest.raises(QLoRAError):
        unload_lora(model)
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------- unload

def test_unload_gives_plain_modules_and_merged_outputs(tiny_llama, token_ids):
    model = tiny_llama(seq_cls=True)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj", "embed_tokens"],
                               modules_to_save=["score"]))
    _randomise_adapters(model)
    adapted = model(token_ids).logits
    trained_score = model.score.modules_to_save.weight.detach().clone()
    out = unload_lora(model)
    assert out is model
    assert not hasattr(model, "qlora_config")
    assert not any(isinstance(m, (LoRALayer, ModulesToSave)) for m in model.modules())
    for layer in model.model.layers:
        assert type(layer.self_attn.q_proj) is nn.Linear
        assert type(layer.self_attn.o_proj) is nn.Linear
        assert type(layer.mlp.gate_proj) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert type(model.score) is nn.Linear and torch.equal(model.score.weight, trained_score)
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(tiny_llama(seq_cls=True).state_dict())
    torch.testing.assert_close(model(token_ids).logits, adapted, atol=ATOL, rtol=0)
    # a plain model again: LoRA can be attached afresh
    add_lora(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))


# ---------------------------------------------------------------- trainable-parameter counts

def _check_trainable(model, config, select):
    plain = copy.deepcopy(model)
    _, total0 = count_parameters(plain)
    assert total0 == sum(p.numel() for p in plain.parameters())
    expected = _expected_lora_params(plain, config.r, select)
    expected_save = sum(p.numel() for n, m in plain.named_modules()
                        if config.modules_to_save and n in config.modules_to_save for p in m.parameters())
    add_lora(model, config)
    trainable, total = count_parameters(model)
    assert trainable == expected + expected_save
    assert total == total0 + expected      # the frozen original beside a modules_to_save copy isn't counted
    # only adapter tensors (and modules_to_save copies) are trainable
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n or ".modules_to_save." in n), n
    return expected


def test_trainable_count_bert(tiny_bert_cls):
    model = tiny_bert_cls()
    targets = ["query", "key", "value", "dense", "word_embeddings"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    expected = _check_trainable(model, cfg, lambda n, m: _suffix_match(n, targets))
    # hand check for hidden 32, intermediate 64, 2 layers, vocab 96: per layer q,k,v,attn-out 4·(32+32),
    # intermediate 4·(32+64), output 4·(64+32); pooler 4·(32+32); embeddings 4·(96+32)
    assert expected == 2 * (4 * 4 * 64 + 4 * 96 + 4 * 96) + 4 * 64 + 4 * 128
    assert isinstance(model.bert.pooler.dense, LoRALinear)     # 'dense' is a suffix: the pooler matches too
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoRALinear)
    assert type(model.classifier) is nn.Linear


def test_trainable_count_bert_with_modules_to_save(tiny_bert_cls):
    model = tiny_bert_cls()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    _check_trainable(model, cfg, lambda n, m: _suffix_match(n, ["query", "value"]))
    assert isinstance(model.classifier, ModulesToSave)


def test_trainable_count_vit(tiny_vit):
    model = tiny_vit()
    # transformers 5 names ViT's attention q/k/v/o_proj and its MLP mlp.fc1/fc2
    # (transformers 4: attention.attention.query/key/value, intermediate.dense, output.dense)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2", "patch_embeddings.projection"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    expected = _check_trainable(model, cfg, lambda n, m: _suffix_match(n, targets))
    # conv: 4·(3·8·8 + 32); 1 layer: q,k,v,o 4·(32+32) each, fc1 4·(32+64), fc2 4·(64+32)
    assert expected == 4 * (3 * 8 * 8 + 32) + 4 * 4 * 64 + 2 * 4 * 96
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, LoRAConv2d)
    assert type(model.classifier) is nn.Linear


def test_trainable_count_llama_all_linear(tiny_llama):
    model = tiny_llama()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    _check_trainable(model, cfg, lambda n, m: type(m) is nn.Linear and n != "lm_head")
    assert type(model.lm_head) is nn.Linear and not isinstance(model.lm_head, LoRALayer)
    assert not model.lm_head.weight.requires_grad
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert type(model.model.embed_tokens) is nn.Embedding     # all-linear: Linear layers only


def test_all_linear_skips_score_head(tiny_llama):
    model = tiny_llama(seq_cls=True)
    add_lora(model, LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"))
    assert type(model.score) is nn.Linear


def test_exclude_modules(tiny_llama):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, lora_alpha=2, target_modules="all-linear", exclude_modules=["k_proj", "mlp.up_proj"]))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert names == {"q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"}


def test_regex_targets(tiny_llama):
    model = tiny_llama()
    found = find_targets(model, LoraConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    assert sorted(found) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


# ---------------------------------------------------------------- the seed's parameter table (meta device)

def test_param_table_vit_base_101_classes():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(num_labels=101)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size, cfg.image_size) == (768, 12, 16, 224)
    with torch.device("meta"):
        model = ViTForImageClassification(cfg)
    assert next(model.parameters()).is_meta
    assert count_parameters(model) == (85_876_325, 85_876_325)
    # head-only: the 768 -> 101 classifier
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier."))
    assert count_parameters(model) == (768 * 101 + 101, 85_876_325)


def test_param_table_roberta_base_head_only():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (768, 12)
    with torch.device("meta"):
        model = RobertaForSequenceClassification(cfg)
    assert count_parameters(model) == (124_647_170, 124_647_170)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier."))
    head = (768 * 768 + 768) + (768 * 2 + 2)       # classifier.dense + classifier.out_proj
    assert head == 592_130
    assert count_parameters(model) == (592_130, 124_647_170)
    assert qlora.print_trainable_parameters(model).startswith("trainable params: 592,130 || all params: 124,647,170")


def test_count_parameters_tied_weights_counted_once(tiny_llama):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _, total = count_parameters(model)
    assert total == sum(p.numel() for p in set(model.parameters()))
    assert total == sum(p.numel() for p in model.parameters())     # torch dedups too


def test_count_parameters_is_memprofiles_count_with_modules_to_save(tiny_bert_cls, tiny_llama):
    """qlora.count_parameters and memprofile's param_counts (the planner's and the sweep's trainable/total)
    are one count: a modules_to_save copy is counted instead of its frozen original, also when that original
    is tied to the embeddings (the embeddings still count: forward uses them)."""
    from memprofile.tensors import param_counts
    bert = tiny_bert_cls()
    _, total0 = count_parameters(bert)
    add_lora(bert, LoraConfig(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"]))
    lora = sum(p.numel() for n, p in bert.named_parameters() if "lora_" in n)
    head = sum(p.numel() for p in bert.classifier.modules_to_save.parameters())
    assert count_parameters(bert) == param_counts(bert) == (lora + head, total0 + lora)
    llama = tiny_llama(tie_word_embeddings=True)
    _, total0 = count_parameters(llama)
    add_lora(llama, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert llama.lm_head.original_module.weight is llama.model.embed_tokens.weight
    lora = sum(p.numel() for n, p in llama.named_parameters() if "lora_" in n)
    head = llama.lm_head.modules_to_save.weight.numel()
    assert count_parameters(llama) == param_counts(llama) == (lora + head, total0 + lora + head)


# ---------------------------------------------------------------- print_trainable_parameters

LINE = re.compile(r"^trainable params: (\d{1,3}(?:,\d{3})*) \|\| all params: (\d{1,3}(?:,\d{3})*) "
                  r"\|\| trainable%: (\d+\.\d{4})$")


def test_print_trainable_parameters_format(tiny_llama, capsys):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    line = print_trainable_parameters(model)
    printed = capsys.readouterr().out
    assert printed == line + "\n"
    m = LINE.match(line)
    assert m, line
    trainable, total = count_parameters(model)
    assert int(m.group(1).replace(",", "")) == trainable
    assert int(m.group(2).replace(",", "")) == total
    assert m.group(3) == f"{100 * trainable / total:.4f}"


def test_print_trainable_parameters_exact_line(capsys):
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Parameter(torch.empty(56_754_688 - 1_171_456, device="meta"), requires_grad=False)
            self.adapter = nn.Parameter(torch.empty(1_171_456, device="meta"))
    line = print_trainable_parameters(Toy())
    assert line == "trainable params: 1,171,456 || all params: 56,754,688 || trainable%: 2.0641"
    assert capsys.readouterr().out.strip() == line


# ---------------------------------------------------------------- bad input: clear error, nothing changed

@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r=0"), (dict(r=-2), "r=-2"), (dict(r=2.5), "r=2.5"), (dict(r=True), "r=True"),
    (dict(lora_alpha=0), "lora_alpha=0"), (dict(lora_alpha=-1.0), "lora_alpha=-1.0"),
    (dict(lora_dropout=1.0), "lora_dropout=1.0"), (dict(lora_dropout=-0.1), "lora_dropout=-0.1"),
    (dict(lora_dropout=1.5), "lora_dropout"), (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(target_modules=None), "target_modules"), (dict(target_modules=[]), "target_modules"),
    (dict(dtype="int8"), "dtype"),
])
def test_bad_config_values(kwargs, match):
    args = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    args.update(kwargs)
    with pytest.raises(QLoRAError, match=re.escape(match)):
        LoraConfig(**args)


def test_unknown_target_lists_closest_names(tiny_llama):
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(QLoRAError) as e:
        add_lora(model, LoraConfig(target_modules=["q_proj", "q_prj"]))
    msg = str(e.value)
    assert "'q_prj'" in msg
    listed = re.search(r"Closest names in this model: (\[[^\]]*\])", msg)
    assert listed, msg
    assert ast.literal_eval(listed.group(1))[0] == "q_proj"
    _assert_unchanged(model, snap)   # q_proj (valid) was not adapted either


def test_unknown_modules_to_save(tiny_bert_cls):
    model = tiny_bert_cls()
    snap = _snapshot(model)
    with pytest.raises(QLoRAError, match="classifer") as e:
        add_lora(model, LoraConfig(target_modules=["query"], modules_to_save=["classifer"]))
    assert "classifier" in str(e.value)
    _assert_unchanged(model, snap)


def test_unsupported_module_type(tiny_bert_cls):
    model = tiny_bert_cls()
    snap = _snapshot(model)
    with pytest.raises(QLoRAError, match="LayerNorm") as e:
        add_lora(model, LoraConfig(target_modules=["query", "attention.output.LayerNorm"]))
    assert "nn.Linear" in str(e.value)
    _assert_unchanged(model, snap)


def test_unsupported_module_type_rmsnorm(tiny_llama):
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(QLoRAError, match="LlamaRMSNorm"):
        add_lora(model, LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("second", [["q_proj"], ["v_proj", "q_proj"], "all-linear"])
def test_adding_lora_twice_to_same_module(tiny_llama, second):
    model = tiny_llama()
    first = "all-linear" if second == "all-linear" else ["q_proj"]
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=first))
    _randomise_adapters(model)
    snap = _snapshot(model)
    with pytest.raises(QLoRAError):
        add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=second))
    _assert_unchanged(model, snap)


def test_target_and_modules_to_save_overlap(tiny_bert_cls):
    model = tiny_bert_cls()
    snap = _snapshot(model)
    with pytest.raises(QLoRAError, match="both"):
        add_lora(model, LoraConfig(target_modules=["classifier"], modules_to_save=["classifier"]))
    _assert_unchanged(model, snap)


def test_second_add_with_other_scaling_refused(tiny_llama):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    snap = _snapshot(model)
    with pytest.raises(QLoRAError, match="r/lora_alpha"):
        add_lora(model, LoraConfig(r=8, lora_alpha=8, target_modules=["v_proj"]))
    _assert_unchanged(model, snap)


def test_second_add_on_other_modules_records_union(tiny_llama):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    assert model.qlora_config.target_modules == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))


def test_unfreeze_head_by_name_trains_exactly_those_modules_and_names_the_closest_on_a_typo(tiny_bert_cls):
    from qlora.levers.modes import unfreeze_head
    model = tiny_bert_cls()
    count = unfreeze_head(model, ["classifier", "pooler"])
    expected = sum(p.numel() for m in (model.classifier, model.bert.pooler) for p in m.parameters())
    assert count == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(QLoRAError, match=r"head module 'poolr' matches no module\. Closest names.*pooler"):
        unfreeze_head(tiny_bert_cls(), ["poolr"])


def test_add_lora_leaves_the_callers_config_unchanged(tiny_llama):
    """One LoraConfig serves many models: add_lora records quantization settings and the union of
    targets on its own copy (model.qlora_config), never on the caller's object."""
    import copy

    from qlora import LoraConfig, add_lora
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    before = copy.deepcopy(cfg)
    model = add_lora(tiny_llama(), cfg)
    add_lora(model, LoraConfig(r=4, target_modules=["v_proj"]))        # a second call: the union is recorded
    assert cfg == before
    assert model.qlora_config is not cfg
    assert sorted(model.qlora_config.target_modules) == sorted(
        n for n in dict(model.named_modules()) if n.endswith(("q_proj", "v_proj")) and "." in n
        and not n.split(".")[-1].startswith("lora"))
