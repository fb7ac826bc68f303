"""qlora.arch.heads: the output-head rule, and the new task head a LoRA classifier trains in full."""
from transformers import RobertaConfig, RobertaForSequenceClassification

from qlora.arch.heads import output_head_paths, task_head_paths
from qlora.levers.modes import build_for_mode
from qlora.lora.config import LoraConfig


def test_causal_lm_has_no_task_head(tiny_llama):
    model = tiny_llama()
    assert output_head_paths(model) == {"lm_head"}
    assert task_head_paths(model) == set()


def test_classifiers_task_heads_are_their_outermost_head_modules(tiny_llama, tiny_bert_cls, tiny_vit):
    roberta = RobertaForSequenceClassification(RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64))
    assert "classifier.dense" in output_head_paths(roberta)
    assert task_head_paths(roberta) == {"classifier"}
    assert task_head_paths(tiny_llama(seq_cls=True)) == {"score"}
    assert task_head_paths(tiny_bert_cls()) == {"classifier"} == task_head_paths(tiny_vit())


def test_lora_mode_trains_a_classifiers_new_head_in_full(tiny_bert_cls):
    reference = tiny_bert_cls()
    model = build_for_mode("lora", load_float=tiny_bert_cls, load_4bit=None,
                           lora=LoraConfig(r=4, target_modules="all-linear"))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = {n: k for n, k in trainable.items() if n.startswith("classifier.")}
    assert head and all(".modules_to_save." in n for n in head)
    assert sum(head.values()) == sum(p.numel() for p in reference.classifier.parameters())
    assert all("lora_" in n for n in trainable if n not in head)     # the body: adapters only


def test_an_explicit_modules_to_save_is_kept(tiny_bert_cls):
    model = build_for_mode("lora", load_float=tiny_bert_cls, load_4bit=None,
                           lora=LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier", "pooler"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("bert.pooler.") for n in trainable)
