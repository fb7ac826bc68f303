"""The doors through which a user's model and tokenizer come in: one rule for what is their problem (exit 2).

    model = from_pretrained_quietly(AutoModelForSequenceClassification, "minilm", num_labels=2)
    # new head classifier: 2 labels, initialised
    tokenizer, pad_id = load_tokenizer("smollm2")          # pad id: the pad token, else EOS

Whatever transformers raises while reading a user's folder or Hub id (no tokenizer files, no config.json, an
unknown model type, unreadable weights: OSError, ValueError, KeyError) is bad input: a QLoRAError naming the
folder and the fix, never a traceback. Errors raised after the files are read are not caught here.

A base checkpoint loaded into a class with a new head (a classifier on an encoder, a 10-class ViT
head) makes transformers log a multi-line "LOAD REPORT" table (MISSING classifier.weight, newly
initialized). That is expected, so it is said in one line: which modules start fresh and, for the
output head, how many labels. Weights missing anywhere else, or checkpoint weights left unused,
are a real surprise and get a line of their own. Everything else transformers logs is unchanged.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from transformers import AutoTokenizer

from qlora.arch.heads import output_head_paths
from qlora.errors import QLoRAError


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _no_load_report():
    """transformers logs the report as one warning of `transformers.modeling_utils` (and of its peft
    integration): drop that record, and only it, for the duration of the load. (Not by raising the
    logger's level: at WARNING or above transformers runs and logs its tensor-parallel plan check.)"""
    loggers = [logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.integrations.peft",
                                              "transformers.modeling_layers")]
    drop = _DropLoadReport()
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def _modules_of(keys) -> list[str]:
    """['classifier.weight', 'classifier.bias', 'bert.pooler.dense.weight'] -> ['classifier', 'bert.pooler.dense']"""
    out = []
    for key in sorted(keys):
        module = key.rpartition(".")[0] or key
        if module not in out:
            out.append(module)
    return out


def describe_load(model, info: dict) -> list[str]:
    """The lines that replace transformers' load report (none when every weight was found and used)."""
    lines = []
    heads = output_head_paths(model)
    missing = _modules_of(info.get("missing_keys") or [])
    new_heads = [m for m in missing if m in heads or any(m.startswith(h + ".") for h in heads)]
    others = [m for m in missing if m not in new_heads]
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    for head in new_heads:
        if not any(head.startswith(other + ".") for other in new_heads):
            lines.append(f"new head {head}: {labels} labels, initialised" if labels and "lm_head" not in head
                         else f"new head {head}: initialised")
    if others:
        lines.append(f"note: {len(others)} module(s) not in the checkpoint, initialised at random: "
                     f"{', '.join(others[:4])}{' ...' if len(others) > 4 else ''}")
    unused = _modules_of(info.get("unexpected_keys") or [])
    if unused:
        lines.append(f"note: {len(unused)} module(s) of the checkpoint unused by {type(model).__name__}: "
                     f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}")
    return lines


def from_pretrained_quietly(cls, path, *, log=None, **kwargs):
    """`cls.from_pretrained(path, **kwargs)`, with transformers' load report replaced by
    `describe_load`'s lines, printed through `log` (default: print to stdout)."""
    log = log or (lambda line: print(line, file=sys.stdout))
    kwargs.pop("output_loading_info", None)
    with _no_load_report(), users_files("model", path):
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    for line in describe_load(model, info):
        log(line)
    return model


@contextlib.contextmanager
def users_files(what: str, path):
    """The one rule at the doors: transformers failing to read the user's `what` at `path` is a QLoRAError."""
    try:
        yield
    except QLoRAError:
        raise
    except (OSError, ValueError, KeyError) as e:
        if _raised_by_qlora(e):      # our own code runs inside from_pretrained (loading hooks): a bug is a bug
            raise
        said = " ".join(str(e).split()) or type(e).__name__          # transformers' words, on one line
        said = said if len(said) <= 160 else said[:157] + "..."
        raise QLoRAError(f"cannot load the {what} of {path} ({said}); give a folder with config.json, the "
                         "weights and the tokenizer files (tokenizer.json or its vocabulary), a bundled name or a Hub "
                         "id") from e


def _raised_by_qlora(e: BaseException) -> bool:
    """Whether the innermost frame of `e`'s traceback is in the qlora package."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_QLORA_DIR)


_QLORA_DIR = Path(__file__).resolve().parents[1]


def load_tokenizer(path) -> tuple:
    """(tokenizer, pad id: its pad token, else EOS) of a model folder or Hub id; QLoRAError when there is none."""
    with users_files("tokenizer", path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise QLoRAError(f"the tokenizer of {path} has neither a pad nor an EOS token; set one in its files")
    return tokenizer, pad_id
