"""The docs checked against the tree, without loading a model (README.md, BENCHMARKS.md, docs/*.md):

- every ```python block parses, every ```json block loads;
- every `qlora SUB ...` command line (```bash / ```sh / ```console blocks, inline code spans; also
  `./run qlora`, `.venv/bin/qlora`, `python -m qlora.cli`, `torchrun ... -m qlora.cli`) names a real
  subcommand and only its options (from the argparse parser `qlora.cli.build_parser` builds);
  `qlora train NAME key=value` / `qlora demo key=value`: a known recipe (or an existing config file)
  and keys of that recipe's config dataclass;
- every `qlora.x.y` / `memprofile.x` name resolves in the tree (an old name of `qlora._MOVED` fails),
  every repository path in code (`qlora/levers/offload.py`, `tests/...::test_x`) exists;
- every relative Markdown link points at an existing file (and heading, for `FILE.md#anchor`);
- README.md has at most 250 lines.

Placeholders are fine where a value or a name goes: `...`, `<a folder>`, `[key=value ...]`, and words in
capitals (`FOLDER_OR_HUB_ID`, `recipes/configs/NAME.yaml`). A block that is deliberately not a whole
program is fenced ```python-snippet (not parsed; its qlora names are still checked).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import json
import re
import shlex
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console", "zsh"}
PYTHON = {"python", "py", "python3"}
REPO_DIRS = ("qlora", "memprofile", "recipes", "tests", "benchmarks", "docs")


# ---------------------------------------------------------------------------------------------------------------
# Reading Markdown: fenced blocks, inline code spans, links, headings (each with its line number)

@dataclasses.dataclass
class Block:
    line: int           # line of the first line inside the fence
    info: str           # the fence's info string, lower case ("" for none)
    text: str


@dataclasses.dataclass
class Doc:
    path: Path
    lines: list[str]
    blocks: list[Block]
    prose: list[tuple[int, str]]      # (line, text) of every line outside fences

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix() if self.path.is_relative_to(ROOT) else self.path.name

    def spans(self):
        """(line, code) of every inline code span outside fences; a span may wrap across lines of a paragraph."""
        paragraph: list[tuple[int, str]] = []
        for line, text in [*self.prose, (0, "")]:
            if text.strip() and line == (paragraph[-1][0] + 1 if paragraph else line):
                paragraph.append((line, text))
                continue
            if paragraph:
                joined = "\n".join(t for _, t in paragraph)
                starts = [0]
                for _, t in paragraph:
                    starts.append(starts[-1] + len(t) + 1)
                for m in re.finditer(r"(`+)(.+?)\1", joined, re.S):
                    index = next(i for i in range(len(paragraph)) if starts[i + 1] > m.start())
                    yield paragraph[index][0], " ".join(m.group(2).split())
            paragraph = [(line, text)] if text.strip() else []


def read_doc(path: Path) -> Doc:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, prose = [], []
    fence = None
    for i, text in enumerate(lines, 1):
        stripped = text.lstrip()
        if fence is None:
            m = re.match(r"(`{3,}|~{3,})\s*([^`\s]*)", stripped)
            if m:
                fence, body = (m.group(1), m.group(2).lower(), i + 1), []
                continue
            prose.append((i, text))
        elif stripped.startswith(fence[0]) and not stripped.strip(fence[0][0]).strip():
            blocks.append(Block(fence[2], fence[1], "\n".join(body)))
            fence = None
        else:
            body.append(text)
    assert fence is None, f"{path.name}:{fence[2] - 1}: a code fence is never closed"
    return Doc(path, lines, blocks, prose)


@functools.lru_cache(maxsize=None)
def doc(path: Path) -> Doc:
    return read_doc(path)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(d: Doc) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, text in d.prose:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", text)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The command line as qlora.cli builds it

@functools.lru_cache(maxsize=None)
def subparsers() -> dict[str, argparse.ArgumentParser]:
    from qlora.cli import build_parser
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@functools.lru_cache(maxsize=None)
def recipe_config(name: str):
    """The config dataclass of recipe `name` (the type of its main()'s first argument, as `run_recipe` finds it:
    through the config's `recipe:` key, so `sft_images` is sft's)."""
    from qlora.cli.recipes import find_config, recipe_name, recipes_package
    package = recipes_package()
    module = importlib.import_module(f"{package.__name__}.{recipe_name(find_config(name))}")
    hints = typing.get_type_hints(module.main)
    return next(v for k, v in hints.items() if k != "return")


@functools.lru_cache(maxsize=None)
def known_recipes() -> tuple[str, ...]:
    from qlora.cli.recipes import known_recipes as names
    return tuple(names())


def run_script_commands() -> set[str]:
    """The commands of ./run (its `case` arms)."""
    return set(re.findall(r"^\s+([a-z]+)\) ", (ROOT / "run").read_text(), re.M))


def is_placeholder(token: str) -> bool:
    return token in ("", "…") or "..." in token or "…" in token or token.startswith(("<", "[")) \
        or re.search(r"[A-Z]{2,}", token) is not None and not token.startswith("--")


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: tokens, comments dropped, split at ; && || |."""
    line = re.sub(r"<[^<>\n]*>", "PLACEHOLDER", line)        # <a MoE folder> is one placeholder
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:                                         # unbalanced quotes: read it word by word
        tokens = line.split("#")[0].split()
    commands, current = [], []
    for token in tokens:
        if token and set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def qlora_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `qlora` when this command runs qlora, else None."""
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):   # VAR=value before the command
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "qlora" or tokens[0].endswith("/bin/qlora"):
        return tokens[1:]
    if tokens[0] == "./run" and len(tokens) > 1:
        if tokens[1] == "qlora":
            return tokens[2:]
        if tokens[1] == "demo":
            return tokens[1:]
        return None
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "qlora.cli":
            return tokens[i + 2:]
    return None


def check_keys(recipe: str, config_class, key: str) -> str | None:
    """None when `key` (dotted) is a field of the recipe's config, else the problem."""
    hint = config_class
    for depth, part in enumerate(key.split(".")):
        if not dataclasses.is_dataclass(hint):
            return None                                        # a dict-valued field: lr.full, lr_grid.lora
        fields = {f.name for f in dataclasses.fields(hint)}
        if part not in fields:
            where = ".".join(key.split(".")[:depth]) or recipe
            return f"{where} has no config key {part!r} (keys: {', '.join(sorted(fields))})"
        hint = typing.get_type_hints(hint).get(part)
    return None


def choices_of_metavar(metavar) -> list[str] | None:
    """`{none,nf4,fp4}`: an option's values as its help shows them."""
    m = re.fullmatch(r"\{(.+)\}", metavar or "")
    return m.group(1).split(",") if m else None


def check_qlora_command(args: list[str]) -> list[str]:
    """The problems of one `qlora ARGS` command line."""
    if not args or is_placeholder(args[0]):
        return []
    if args[0] in ("-h", "--help", "--version"):
        return []
    parsers = subparsers()
    sub = args[0]
    if sub not in parsers:
        return [f"`qlora {sub}`: no such subcommand (subcommands: {', '.join(sorted(parsers))})"]
    parser = parsers[sub]
    options = {s: a for a in parser._actions for s in a.option_strings}
    positional: list[str] = []
    problems = []
    rest = args[1:]
    i = 0
    optional_group = False
    while i < len(rest):
        token = rest[i]
        i += 1
        if optional_group or token.startswith("["):            # [key=value ...]: an optional, placeholder group
            optional_group = not token.endswith("]")
            continue
        if token.startswith("-") and len(token) > 1 and not re.match(r"-\d", token):
            name, eq, value = token.partition("=")
            action = options.get(name)
            if action is None:
                problems.append(f"`qlora {sub}` has no option {name} (options: {', '.join(sorted(options))})")
                continue
            if action.nargs == 0:
                continue
            if not eq:
                if i < len(rest) and not rest[i].startswith("--"):
                    value = rest[i]
                    i += 1
                else:
                    continue                                     # `--adapter` named in prose, value left out
            choices = action.choices or choices_of_metavar(action.metavar)
            if choices and not is_placeholder(value) and value not in choices:
                problems.append(f"`qlora {sub} {name}` takes one of {', '.join(map(str, choices))}, not {value!r}")
            continue
        positional.append(token)
    if sub in ("train", "demo"):
        if sub == "train":
            if not positional:
                return problems
            name, overrides = positional[0], positional[1:]
            if is_placeholder(name):
                return problems
            if name in known_recipes():
                recipe = name
            elif (ROOT / name).is_file():
                recipe = yaml_recipe(ROOT / name)
            else:
                return [*problems, f"`qlora train {name}`: no such recipe or config file "
                                   f"(recipes: {', '.join(known_recipes())})"]
        else:
            recipe, overrides = "demo", positional
        config_class = recipe_config(recipe)
        for token in overrides:
            if is_placeholder(token):
                continue
            key, eq, _ = token.partition("=")
            if not eq:
                problems.append(f"`qlora {sub}`: {token!r} is not key=value")
            elif not is_placeholder(key):
                problem = check_keys(recipe, config_class, key)
                if problem:
                    problems.append(f"`qlora {sub} {recipe} {token}`: {problem}")
    else:
        takes = [a for a in parser._actions if not a.option_strings]
        for token in positional[len(takes):]:
            if not is_placeholder(token):
                problems.append(f"`qlora {sub}` takes no argument {token!r} (only options)")
    return problems


def yaml_recipe(path: Path) -> str:
    m = re.search(r"^recipe:\s*(\w+)", path.read_text(), re.M)
    return m.group(1) if m else path.stem


def command_lines(d: Doc):
    """(line, text) of every shell command line in d: shell blocks (continuations joined; in console blocks
    the `$ ` lines) and inline spans that start with `qlora ` or `./run `."""
    for block in d.blocks:
        if block.info not in SHELL:
            continue
        lines = block.text.split("\n")
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i]
            i += 1
            if block.info == "console":
                if not text.lstrip().startswith("$ "):
                    continue
                text = text.lstrip()[2:]
            yield block.line + start, text
    for line, code in d.spans():
        if code.startswith(("qlora ", "./run ")):
            yield line, code


def command_problems(d: Doc) -> list[str]:
    problems = []
    run_commands = run_script_commands()
    for line, text in command_lines(d):
        for tokens in split_commands(text):
            if tokens[0] == "./run" and len(tokens) > 1 and tokens[1] not in run_commands:
                problems.append(f"{d.name}:{line}: `./run {tokens[1]}`: ./run has no such command "
                                f"(commands: {', '.join(sorted(run_commands))})")
            args = qlora_args(tokens)
            if args is not None:
                problems += [f"{d.name}:{line}: {p}" for p in check_qlora_command(args)]
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Names and paths

def moved() -> dict[str, str]:
    import qlora
    return dict(qlora._MOVED)


@functools.lru_cache(maxsize=None)
def resolve(dotted: str) -> str | None:
    """None when `dotted` (qlora.a.b.c) is a module or an attribute of one in the tree, else the problem."""
    parts = dotted.split(".")
    old = moved()
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in old:
            return f"`{name}` is an old name: the module is `{old[name]}`"
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, AttributeError, ValueError):
            spec = None
        if spec is not None:
            break
    else:
        return f"`{dotted}`: no such module"
    obj = importlib.import_module(name)
    for j, attr in enumerate(parts[i:], i):
        if not hasattr(obj, attr):
            try:                                               # a submodule not imported by its package
                obj = importlib.import_module(".".join(parts[:j + 1]))
                continue
            except ImportError:
                return f"`{dotted}`: `{'.'.join(parts[:j])}` has no `{attr}`"
        obj = getattr(obj, attr)
    return None


NAME = re.compile(r"(?<![\w/.-])(?:qlora|memprofile)(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w/.-])(?:" + "|".join(REPO_DIRS) + r")/[\w./*{}-]*")


def python_names(code: str) -> list[str]:
    """Dotted qlora names a piece of Python uses: imports and attribute chains from `qlora`."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return NAME.findall(code)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name):
                names.append(".".join([inner.id, *reversed(chain)]))
    return [n for n in names if n.split(".")[0] in ("qlora", "memprofile") and "." in n]


def name_and_path_problems(d: Doc) -> list[str]:
    found: list[tuple[int, str, str]] = []     # (line, kind, text)
    for block in d.blocks:
        if block.info in PYTHON or block.info.startswith("python"):
            found += [(block.line, "name", n) for n in python_names(block.text)]
        elif block.info in SHELL:
            for k, text in enumerate(block.text.split("\n")):
                found += [(block.line + k, "path", p) for p in PATH.findall(text)]
                found += [(block.line + k, "name", n) for n in NAME.findall(text)]
    for line, code in d.spans():
        found += [(line, "path", p) for p in PATH.findall(code)]
        found += [(line, "name", n) for n in NAME.findall(code)]
    problems = []
    for line, kind, text in found:
        if kind == "name":
            problem = resolve(text.rstrip("."))
        else:
            path = text.split("::")[0].rstrip(".,:;")
            if is_placeholder(path) or set("*{}") & set(path):
                continue
            problem = None if (ROOT / path).exists() else f"`{path}`: no such file or folder in the repository"
        if problem:
            problems.append(f"{d.name}:{line}: {problem}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# The tests

def _ids(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def block_problems(d: Doc) -> list[str]:
    problems = []
    for block in d.blocks:
        if block.info in PYTHON:
            try:
                ast.parse(block.text)
            except SyntaxError as e:
                problems.append(f"{d.name}:{block.line + (e.lineno or 1) - 1}: the python block does not parse: "
                                f"{e.msg} (mark a partial block ```python-snippet)")
        elif block.info == "json":
            try:
                json.loads(block.text)
            except json.JSONDecodeError as e:
                problems.append(f"{d.name}:{block.line + e.lineno - 1}: the json block does not load: {e.msg}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=_ids)
def test_python_blocks_parse(path):
    problems = block_problems(doc(path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=_ids)
def test_commands_use_real_subcommands_options_and_keys(path):
    problems = command_problems(doc(path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=_ids)
def test_module_names_and_paths_exist(path):
    problems = name_and_path_problems(doc(path))
    assert not problems, "\n".join(problems)


def link_problems(d: Doc) -> list[str]:
    problems = []
    for line, text in d.prose:
        for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):       # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            where = (d.path.parent / file).resolve() if file else d.path
            if not where.exists():
                problems.append(f"{d.name}:{line}: link {target!r}: {file} does not exist")
            elif anchor and where.suffix == ".md" and anchor not in anchors(read_doc(where)):
                problems.append(f"{d.name}:{line}: link {target!r}: {where.name} has no heading "
                                f"with anchor #{anchor}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=_ids)
def test_relative_links_point_at_files_and_headings(path):
    problems = link_problems(doc(path))
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    n = len(doc(ROOT / "README.md").lines)
    assert n <= README_MAX_LINES, (f"README.md: {n} lines, more than {README_MAX_LINES}: move the detail into "
                                   f"docs/ and results into BENCHMARKS.md")


def test_the_checks_catch_wrong_docs(tmp_path):
    """The checker itself: each kind of mistake in a small page is reported with its line."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "# Title",                                                       # 1
        "```bash",                                                       # 2
        "qlora plan --model x.json --memory 24GiB --no-such-option",     # 3
        "qlora train sft data=my.jsonl no_such_key=1 lora.r=8",          # 4
        "qlora train sft train.no_such=1 lr=1e-4 \\",                    # 5
        "  packing=true",                                                # 6
        "qlora frobnicate",                                              # 7
        "qlora export --base B --adapter A --merge-onto x --requantize int3",   # 8
        "```",                                                           # 9
        "See `qlora profile --batches 4` and `qlora.losses.causal_lm_loss`, `qlora/nowhere.py`.",   # 10
        "```python",                                                     # 11
        "def f(:",                                                       # 12
        "```",                                                           # 13
        "[gone](docs/none.md) [ok](#title) [bad anchor](#nothing)",      # 14
    ]) + "\n")
    d = read_doc(page)
    commands = command_problems(d)
    assert any(":3:" in p and "--no-such-option" in p for p in commands), commands
    assert any(":4:" in p and "no_such_key" in p for p in commands), commands
    assert not any(":4:" in p and "lora.r" in p for p in commands), commands
    assert any(":5:" in p and "'no_such'" in p for p in commands), commands
    assert any(":5:" in p and "lr=" in p and "has no config key 'lr'" in p for p in commands), commands
    assert any(":7:" in p and "frobnicate" in p for p in commands), commands
    assert any(":8:" in p and "int3" in p for p in commands), commands
    assert any(":8:" in p and "'x'" in p for p in commands), commands
    assert any(":10:" in p and "--batches" in p for p in commands), commands
    names = name_and_path_problems(d)
    assert any(":10:" in p and "qlora.objectives.losses" in p for p in names), names
    assert any(":10:" in p and "qlora/nowhere.py" in p for p in names), names
    blocks = block_problems(d)
    assert len(blocks) == 1 and ":12:" in blocks[0], blocks
    links = link_problems(d)
    assert len(links) == 2 and any("none.md" in p for p in links) and any("#nothing" in p for p in links), links
    assert resolve("qlora.objectives.losses.causal_lm_loss") is None
    assert resolve("qlora.objectives.losses.no_such_function") is not None
