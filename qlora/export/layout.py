"""A checkpoint read as its model sees it: transformers' own conversion mapping, one group of tensors at a time.

transformers 5 converts a checkpoint's layout when it loads (transformers/conversion_mapping.py,
core_model_loading.py): keys renamed (Sarvam-MoE's `attention.dense` -> `self_attn.o_proj`, Gemma 3's
`language_model.model.` -> `model.language_model.`, a base model's keys given the head model's prefix), fused
tensors split (`query_key_value` -> q/k/v_proj), per-expert tensors stacked into [E, a, b] matrices.
`ModelLayout` applies the mapping of the folder's model class to its keys, as `from_pretrained` does, and
reverts it as `save_pretrained` does:

    layout = ModelLayout(folder, tensor_specs(files))   # headers only: the groups, their names and shapes
    for group in layout.groups:          # one converted group: a tensor, q/k/v of one layer, a layer's experts
        tensors = layout.read(group)     # {model tensor name: tensor}, what from_pretrained puts in the model
        layout.revert(group, tensors)    # {checkpoint key: tensor}, what save_pretrained writes
    layout.tensor("model.layers.0.self_attn.k_proj.weight")

A checkpoint key the model has no tensor for is a group of its own, kept under its key. Memory: one group
(its checkpoint tensors, then the converted copies); the model is built on the meta device.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from qlora.arch.loading import users_files
from qlora.export.checkpoint import read_tensor


def model_class_for(config: dict):
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


@dataclass
class Group:
    name: str                               # the first model tensor it makes (transformers' key for the group)
    sources: list[tuple[str, str]]          # (checkpoint key, the converter's source pattern it matched)
    converter: object = None                # a WeightConverter, or None: one tensor, renamed at most
    known: bool = True                      # False: the model has no such tensor (kept as is)
    shapes: dict = field(default_factory=dict)   # model tensor name -> shape
    out: dict = field(default_factory=dict)      # output key -> (shape, checkpoint dtype), in write order


class ModelLayout:
    def __init__(self, folder: Path, specs: dict, config_overrides: dict | None = None):
        """`specs`: {checkpoint key: (file, shape, dtype)} (qlora.export.checkpoint.tensor_specs); the model is the
        class config.json names, after `config_overrides` (an adapter trained as another class says which)."""
        from transformers.conversion_mapping import get_model_conversion_mapping  # lazy: transformers >= 5 only
        from transformers.core_model_loading import (  # lazy: transformers >= 5 only
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        with users_files("model config", folder), torch.device("meta"):
            config = transformers.AutoConfig.from_pretrained(folder, **(config_overrides or {}))
            self.model = model_class_for(config.to_dict())._from_config(config)
        self.specs = specs
        mapping = get_model_conversion_mapping(self.model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta_state, prefix = self.model.state_dict(), self.model.base_model_prefix
        groups: dict[str, Group] = {}
        for key in sorted(specs, key=dot_natural_key):      # transformers' own order: a group's tensors in order
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
            if name not in meta_state and key in meta_state:
                name, pattern = rename_source_key(key, [], [], prefix, meta_state)
            if name not in meta_state:
                groups[key] = Group(key, [(key, None)], known=False)
                continue
            group = groups.setdefault(name, Group(name, [], by_pattern.get(pattern)))
            group.sources.append((key, pattern))
        self.model._weight_conversions = [m for m in mapping if m.was_used()]   # what save_pretrained reverts
        self.groups = list(groups.values())
        for group in self.groups:                            # names and shapes, on meta tensors
            made = self.read(group, meta=True)
            group.shapes = {n: tuple(t.shape) for n, t in made.items()}
            group.out = {k: (tuple(t.shape), t.dtype) for k, t in self.revert(group, made).items()}
        self.group_of = {n: g for g in self.groups for n in g.shapes}

    def read(self, group: Group, meta: bool = False) -> dict[str, torch.Tensor]:
        """{model tensor name: tensor} of one group, through transformers' conversion (`meta`: shapes only)."""
        def load(key):
            _, shape, dtype = self.specs[key]
            return torch.empty(shape, dtype=dtype, device="meta") if meta else read_tensor(self.specs[key][0], key)
        if group.converter is None:
            return {group.name: load(group.sources[0][0])}
        converter = deepcopy(group.converter)
        for key, pattern in group.sources:
            converter.add_tensor(group.name, key, pattern, load(key))
        made = converter.convert(group.name, model=self.model, config=self.model.config)
        return {n: t[0] if isinstance(t, list) else t for n, t in made.items()}

    def revert(self, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{checkpoint key: tensor} for a group's model tensors: transformers' revert, what save_pretrained writes."""
        from transformers.core_model_loading import revert_weight_conversion  # lazy: transformers >= 5 only
        return dict(tensors) if not group.known else revert_weight_conversion(self.model, tensors)

    def tensor(self, name: str) -> torch.Tensor:
        """One model tensor (its whole group is read and converted)."""
        return self.read(self.group_of[name])[name]

    @property
    def shapes(self) -> dict[str, tuple]:
        """{model tensor name: shape} of every tensor the checkpoint holds (unknown keys under their own name)."""
        return {n: s for g in self.groups for n, s in g.shapes.items()}
