"""Bad input to every `qlora` subcommand: one line naming the problem and the fix, exit 2, no traceback.

    .venv/bin/python -m pytest -q tests/qlora/cli/test_errors.py      (~20 s)

Each case runs `qlora.cli.main([...])` in-process and checks the exit status, that stderr holds no
"Traceback", and the key words of the message. A few run as real subprocesses (the installed entry
point's path: `python -m qlora.cli`) to prove nothing else reaches stderr. Also: a bug (an
unexpected exception) prints its traceback and a line saying it is one, exit 3; every option of
every subcommand has help text.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.cli import build_parser, main

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CONFIGS = REPO / "recipes" / "configs"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny float Llama base folder, an adapter trained on it, and a zoo of broken inputs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import qlora
    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    adapter = root / "adapter"
    qlora.save_adapter(qlora.add_lora(LlamaForCausalLM(cfg), qlora.LoraConfig(r=2, target_modules=["q_proj"])),
                       adapter)
    other = root / "other-size"            # same architecture, another width: the adapter does not fit
    LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "hidden_size": 32, "intermediate_size": 64})).save_pretrained(other)
    p = {"root": root, "base": base, "adapter": adapter, "other": other}

    def folder(name, **contents):
        f = root / name
        f.mkdir()
        for file, text in contents.items():
            (f / file.replace("__", ".")).write_bytes(text if isinstance(text, bytes) else text.encode())
        return f
    p["not_json"] = folder("not-json", config__json="{not json")
    p["list_json"] = folder("list-json", config__json="[1, 2]")
    p["unknown_type"] = folder("unknown_type", config__json=json.dumps({"model_type": "wobble", "hidden_size": 8}))
    p["empty"] = folder("empty")
    p["no_weights"] = folder("no-weights", config__json=(base / "config.json").read_text())
    p["pickled"] = folder("pickled", config__json=(base / "config.json").read_text(), pytorch_model__bin=b"\x80\x04")
    p["adapter_bad_json"] = folder("adapter-bad-json", adapter_config__json="{")
    p["adapter_no_weights"] = folder("adapter-no-weights",
                                     adapter_config__json=(adapter / "adapter_config.json").read_text())
    p["adapter_bin"] = folder("adapter-bin", adapter_config__json=(adapter / "adapter_config.json").read_text(),
                              adapter_model__bin=b"\x80\x04")
    p["adapter_corrupt"] = folder("adapter-corrupt", adapter_config__json=(adapter / "adapter_config.json").read_text(),
                                  adapter_model__safetensors=b"garbage, not safetensors")
    p["adapter_dora"] = folder("adapter-dora", adapter_config__json=json.dumps(
        {**json.loads((adapter / "adapter_config.json").read_text()), "use_dora": True}),
        adapter_model__safetensors=(adapter / "adapter_model.safetensors").read_bytes())
    p["file"] = root / "a-file"
    p["file"].write_text("x")
    p["yaml_bad"] = root / "bad.yaml"
    p["yaml_bad"].write_text("recipe: seq_cls\nmodel: [unclosed\n")
    p["yaml_norecipe"] = root / "norecipe.yaml"
    p["yaml_norecipe"].write_text("model: minilm\n")
    p["yaml_unknown_recipe"] = root / "unknown.yaml"
    p["yaml_unknown_recipe"].write_text("recipe: nosuchrecipe\n")
    p["exists"] = folder("exists")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>"))
    p["tokenizer_only"] = root / "tokenizer_only"     # a tokenizer, and no config.json nor weights
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>").save_pretrained(p["tokenizer_only"])
    p["text_data"] = root / "text.jsonl"
    p["text_data"].write_text('{"text": "a a a"}\n' * 8)
    return p


def _fmt(arg, p):
    return str(arg).format(**{k: v for k, v in p.items()}) if isinstance(arg, str) else str(arg)


# (subcommand args, key words that must be in the message); {name} is a path from `files`
PLAN = ["plan", "--memory", "24GiB", "--model"]
PROFILE = ["profile", "--out", "{root}/profile-out", "--model"]
EXPORT = ["export", "--base", "{base}", "--adapter", "{adapter}", "--out", "{root}/never-written"]
CASES = [
    # plan: an estimator-only command; validated at the CLI boundary
    (PLAN + ["{not_json}"], ["config.json", "not valid JSON"]),
    (PLAN + ["{not_json}/config.json"], ["not valid JSON"]),
    (PLAN + ["{list_json}"], ["model_type"]),
    (PLAN + ["{unknown_type}"], ["wobble", "cannot build"]),
    (PLAN + ["{root}/missing.json"], ["does not exist"]),
    (PLAN + ["{root}/missing-folder"], ["does not exist"]),
    (PLAN + ["{file}"], ["is a file", "folder"]),
    (PLAN + ["{empty}"], ["has no config.json"]),
    (["plan", "--model", "{base}", "--memory", "24XB"], ["24XB", "24GiB"]),
    (["plan", "--model", "{base}", "--memory", "lots"], ["lots", "24GiB"]),
    (["plan", "--model", "{base}", "--memory", "0GB"], ["positive"]),
    (["plan", "--model", "{base}", "--memory=-3GB"], ["positive"]),
    (["plan", "--model", "{base}", "--memory", "inf"], ["not understood"]),
    (["plan", "--model", "{base}", "--memory", "24GiB", "--seq", "0"], ["--seq", ">= 1"]),
    (["plan", "--model", "{base}", "--memory", "24GiB", "--seq", "1.5"], ["--seq", "integer"]),
    (["plan", "--model", "{base}", "--memory", "24GiB", "--rank=-4"], ["--rank", ">= 1"]),
    (["plan", "--model", "{base}", "--memory", "24GiB", "--dtype", "float8"], ["float8", "bfloat16"]),
    (["plan", "--model", "{base}", "--memory", "24GiB", "--device", "tpu"], ["tpu", "cuda"]),
    (["plan", "--model", "{base}", "--memory", "24GiB", "--task", "translation"], ["translation", "causal-lm"]),
    (["plan", "--memory", "24GiB"], ["--model", "required"]),
    # profile
    (PROFILE + ["{not_json}"], ["not valid JSON"]),
    (PROFILE + ["{root}/missing-folder"], ["does not exist"]),
    (PROFILE + ["{base}", "--batch", "0"], ["--batch", ">= 1"]),
    (PROFILE + ["{base}", "--batch", "one"], ["--batch", "integers"]),
    (PROFILE + ["{base}", "--seq", "8,-1"], ["--seq", ">= 1"]),
    (PROFILE + ["{base}", "--rank", "0"], ["--rank", ">= 1"]),
    (PROFILE + ["{base}", "--dtype", "int8"], ["int8", "float32"]),
    (PROFILE + ["{base}", "--configs", "qlora,fast"], ["fast", "allowed"]),
    (PROFILE + ["{base}", "--task", "translation"], ["translation", "causal-lm"]),
    (PROFILE + ["{base}", "--lora-dropout", "1.5"], ["lora_dropout"]),
    (PROFILE + ["{base}", "--lora-dropout", "lots"], ["--lora-dropout", "lots"]),
    # export
    (["export", "--base", "{base}", "--adapter", "{root}/missing", "--out", "{root}/o"], ["does not exist"]),
    (["export", "--base", "{base}", "--adapter", "{file}", "--out", "{root}/o"], ["is a file", "folder"]),
    (["export", "--base", "{base}", "--adapter", "{empty}", "--out", "{root}/o"], ["adapter_config.json"]),
    (["export", "--base", "{base}", "--adapter", "{adapter_bad_json}", "--out", "{root}/o"], ["not valid JSON"]),
    (["export", "--base", "{base}", "--adapter", "{adapter_no_weights}", "--out", "{root}/o"],
     ["adapter_model.safetensors"]),
    (["export", "--base", "{base}", "--adapter", "{adapter_bin}", "--out", "{root}/o"], ["never unpickles"]),
    (["export", "--base", "{base}", "--adapter", "{adapter_corrupt}", "--out", "{root}/o"], ["not a safetensors"]),
    (["export", "--base", "{base}", "--adapter", "{adapter_dora}", "--out", "{root}/o"], ["use_dora", "not supported"]),
    (["export", "--base", "{root}/missing", "--adapter", "{adapter}", "--out", "{root}/o"], ["does not exist"]),
    (["export", "--base", "{file}", "--adapter", "{adapter}", "--out", "{root}/o"], ["is a file"]),
    (["export", "--base", "{empty}", "--adapter", "{adapter}", "--out", "{root}/o"], ["config.json"]),
    (["export", "--base", "{no_weights}", "--adapter", "{adapter}", "--out", "{root}/o"], ["no .safetensors"]),
    (["export", "--base", "{pickled}", "--adapter", "{adapter}", "--out", "{root}/o"], ["unpickles"]),
    (["export", "--base", "{other}", "--adapter", "{adapter}", "--out", "{root}/o"], ["another model size"]),
    (["export", "--base", "{base}", "--adapter", "{adapter}", "--out", "{exists}"], ["already exists", "--force"]),
    (["export", "--base", "{base}", "--adapter", "{adapter}", "--out", "{file}/sub"], ["a-file", "is a file"]),
    (EXPORT + ["--dtype", "int4"], ["int4", "bfloat16"]),
    (EXPORT + ["--max-shard-size", "0"], ["positive"]),
    (EXPORT + ["--max-shard-size", "2XB"], ["2XB"]),
    (EXPORT + ["--requantize", "nf8"], ["nf8", "nf4"]),
    (EXPORT + ["--merge-onto", "nothing"], ["nothing", "dequantized"]),
    (["export", "--base", "{base}", "--adapter", "{adapter}"], ["--out", "required"]),
    # train / demo: config files and key=value overrides
    (["train", "{root}/missing.yaml"], ["not found", "recipes"]),
    (["train", "{yaml_bad}"], ["not valid YAML", "line 3"]),
    (["train", "{yaml_norecipe}"], ["recipe"]),
    (["train", "{yaml_unknown_recipe}"], ["nosuchrecipe", "recipes: "]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "lora.r"], ["key=value"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "no_such_key=1"], ["no_such_key", "allowed"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "mode=fast"], ["fast", "allowed"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train_size=-5"], ["train_size"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.batch_size=0"], ["batch_size", ">= 1"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.optimizer=sgd"], ["sgd", "adamw"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "lr.lora=-1"], ["lr.lora", "> 0"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.eval_every=0"], ["eval_every", ">= 1"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.save_every=-2"], ["save_every", ">= 1"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.max_steps=0"], ["max_steps", ">= 1"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.max_grad_norm=-1"], ["max_grad_norm", "> 0"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.weight_decay=-0.1"], ["weight_decay", ">= 0"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.warmup_ratio=1.5"], ["warmup_ratio"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.resume=maybe"], ["resume", "true or false"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "train.warmup_ratio=[1]"], ["warmup_ratio"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "lora.r=0"], ["r"]),
    (["train", str(CONFIGS / "seq_cls.yaml"), "compute_dtype=int8"], ["int8"]),
    # the doors: a model folder the user gave that transformers cannot read (one rule: qlora.arch.loading)
    (["train", "sft", "model={base}", "out_dir={root}/sft-out"], ["tokenizer", "base", "tokenizer.json"]),
    (["train", "dpo", "model={base}", "out_dir={root}/dpo-out"], ["tokenizer", "base"]),
    (["train", "sft", "model={empty}", "out_dir={root}/sft-out"], ["tokenizer", "empty"]),
    (["train", "sft", "model={unknown_type}", "out_dir={root}/sft-out"], ["unknown_type"]),
    (["train", "seq_cls", "model={base}", "out_dir={root}/cls-out"], ["tokenizer", "base"]),
    (["train", "sentiment_prompt", "model={no_weights}", "out_dir={root}/sp-out"], ["tokenizer", "no-weights"]),
    (["train", "sft", "model={tokenizer_only}", "data={text_data}", "eval_fraction=0", "out_dir={root}/sft-out"],
     ["model", "tokenizer_only", "config.json"]),
    (["train", "sft", "model={tokenizer_only}", "data={text_data}", "eval_fraction=0", "mode=lora",
      "out_dir={root}/sft-out"], ["model", "tokenizer_only", "config.json"]),
    (["demo", "no_such_key=1"], ["no_such_key"]),
    (["demo", "--out", "{file}/sub", "mode=fast"], ["fast"]),
    (["nosuchcommand"], ["invalid choice"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(c[0][:3]) + f"#{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2(files, argv, words, capsys):
    argv = [_fmt(a, files) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:           # argparse: usage + one "error:" line, exit 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last, err
    for word in words:
        assert word.lower() in last.lower(), (word, last)
    assert not (files["root"] / "never-written").exists() and not (files["root"] / "o").exists()


@pytest.mark.parametrize("argv, words", [
    (["plan", "--model", "{unknown_type}", "--memory", "24GiB"], ["wobble"]),
    (["train", "{yaml_bad}"], ["not valid YAML"]),
    (["export", "--base", "{base}", "--adapter", "{adapter_corrupt}", "--out", "{root}/o"], ["safetensors"]),
])
def test_bad_input_in_a_subprocess_prints_one_line(files, argv, words):
    """The real process: stderr is exactly one line (no warnings, no traceback), exit 2."""
    proc = subprocess.run([sys.executable, "-m", "qlora.cli", *[_fmt(a, files) for a in argv]], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_a_bug_prints_its_traceback_and_says_so(monkeypatch, capsys):
    import qlora.cli as cli

    def broken(args):
        raise RuntimeError("an internal invariant broke")
    monkeypatch.setattr(cli.export, "run", broken)
    monkeypatch.setattr(cli, "build_parser", _parser_with({"export": broken}))
    rc = main(["export", "--base", "b", "--adapter", "a", "--out", "o"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "Traceback" in err and "an internal invariant broke" in err
    assert "bug in qlora" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("exc, words", [(MemoryError(), ["out of memory", "batch"]),
                                        (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be..."),
                                         ["out of memory (CUDA error: out of memory)", "batch"]),
                                        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                      "can't allocate memory: you tried to allocate 8 bytes"),
                                         ["out of memory", "can't allocate memory", "batch"]),
                                        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                         ["out of memory (CUDA out of memory.", "batch"]),
                                        (OSError(28, "No space left on device", "/x/model.safetensors"),
                                         ["No space left", "/x/model.safetensors", "disk space"]),
                                        (KeyboardInterrupt(), ["interrupted"])])
def test_environment_errors_are_one_line(monkeypatch, capsys, exc, words):
    def failing(args):
        raise exc
    monkeypatch.setattr("qlora.cli.build_parser", _parser_with({"export": failing}))
    rc = main(["export", "--base", "b", "--adapter", "a", "--out", "o"])
    err = capsys.readouterr().err
    assert rc == (130 if isinstance(exc, KeyboardInterrupt) else 2)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err


def _parser_with(funcs: dict):
    def build():
        parser = build_parser()
        for action in parser._subparsers._group_actions:
            for name, sub in action.choices.items():
                if name in funcs:
                    sub.set_defaults(func=funcs[name])
        return parser
    return build


def test_every_option_has_help_text():
    parser = build_parser()
    subs = {name: sub for a in parser._subparsers._group_actions for name, sub in a.choices.items()}
    assert set(subs) >= {"demo", "train", "profile", "plan", "export"}
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, f"qlora {name} {'/'.join(action.option_strings) or action.dest} has no help text"


@pytest.mark.parametrize("command", ["", "demo", "train", "profile", "plan", "export"])
def test_help_is_fast_and_imports_no_torch(command):
    """`qlora [COMMAND] --help` must not import torch (that alone takes seconds); timed in-process."""
    code = ("import sys, time; t = time.perf_counter()\n"
            "from qlora.cli import main\n"
            f"try: main([{command!r}, '--help'] if {command!r} else ['--help'])\n"
            "except SystemExit: pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("NO-TORCH"), proc.stdout[-300:]
