"""An Ollama Modelfile for a GGUF export: FROM the file, the chat template as Go TEMPLATE, stops, defaults.

    warnings = write_modelfile(path, "model.gguf", base_folder)      # then: ollama create NAME -f model.Modelfile

The chat template (Jinja) is not translated by parsing it: for each known shape (ChatML, Llama 3, Gemma) a Go
template and the same rendering in Python are kept side by side, and the model's own template is rendered with
transformers on probe conversations (with and without a system message, several turns, the generation prompt).
Only a shape whose Python rendering equals the model's on every probe is written as TEMPLATE; a default system
prompt the template inserts (SmolLM2's) becomes SYSTEM. Otherwise the Modelfile says in a comment that the
template was not translated and has no TEMPLATE (Ollama then uses the GGUF's tokenizer.chat_template where it
can). Stops: the shape's end-of-turn token and the eos token(s) of generation_config.json; PARAMETER
temperature / top_p / top_k / repeat_penalty from generation_config.json where it sets them.
Run: pytest tests/qlora/export/test_gguf.py -k modelfile.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SYSTEM_MARK = "\x00SYSTEM\x00"


@dataclass(frozen=True)
class ChatShape:
    name: str
    template: str                                      # Ollama's Go template
    render: Callable[[list[dict]], str]                # the same in Python: messages -> text, generation prompt on
    end_of_turn: str


def _chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _llama3(messages):
    return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                   for m in messages) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _gemma(messages):
    return "".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n{m['content']}"
                   "<end_of_turn>\n" for m in messages) + "<start_of_turn>model\n"


SHAPES = (
    ChatShape("ChatML", "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                        "<|im_start|>assistant\n", _chatml, "<|im_end|>"),
    ChatShape("Llama 3", "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"
                         "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n", _llama3, "<|eot_id|>"),
    ChatShape("Gemma", "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}"
                       "{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
              _gemma, "<end_of_turn>"),
)

PROBES = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one."}],
)


def translate(tok) -> tuple[ChatShape | None, str | None]:
    """(the shape the tokenizer's chat template renders exactly like, the default system prompt it inserts
    when the conversation has none), or (None, None)."""
    if not tok.chat_template:
        return None, None
    bos = tok.bos_token or ""
    rendered = []
    for probe in PROBES:
        try:
            text = tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        except Exception:     # noqa: BLE001 -- a template that refuses a probe (e.g. a system message): no shape
            return None, None
        # a template that writes the BOS token itself: llama.cpp and Ollama add it from the GGUF's tokenizer keys
        rendered.append({text, text.removeprefix(bos)} if bos else {text})
    for shape in SHAPES:
        system = next((s for t in rendered[0] if (s := default_system(shape, t, PROBES[0])) is not None), None)
        for probe, texts in zip(PROBES, rendered):
            has_system = probe[0]["role"] == "system"
            messages = probe if has_system or system is None else [{"role": "system", "content": system}, *probe]
            if shape.render(messages) not in texts:
                break
        else:
            return shape, system
    return None, None


def default_system(shape: ChatShape, text: str, probe: list[dict]) -> str | None:
    """The system message `shape` would need to render `probe` (no system message) as `text`, or None."""
    if shape.render(probe) == text:
        return None
    marked = shape.render([{"role": "system", "content": SYSTEM_MARK}, *probe])
    head, _, tail = marked.partition(SYSTEM_MARK)
    if text.startswith(head) and text.endswith(tail) and len(text) > len(head) + len(tail):
        return text[len(head):len(text) - len(tail)]
    return None


def modelfile_text(gguf_name: str, folder: Path) -> tuple[str, list[str]]:
    """The Modelfile for `gguf_name` made from the model folder `folder`; (text, warnings)."""
    from transformers import AutoTokenizer  # lazy: only when a Modelfile is written
    tok = AutoTokenizer.from_pretrained(str(folder))
    lines = [f"# Ollama Modelfile written by qlora export: ollama create NAME -f {Path(gguf_name).stem}.Modelfile",
             f"FROM ./{gguf_name}"]
    warnings = []
    shape, system = translate(tok)
    stops = []
    if shape is not None:
        lines.append(f"# TEMPLATE: the model's chat template is {shape.name}-shaped (checked on probe conversations)")
        lines.append(f'TEMPLATE """{shape.template}"""')
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
        stops.append(shape.end_of_turn)
    elif tok.chat_template:
        lines.append("# TEMPLATE omitted: the chat template is not one of the shapes qlora translates (ChatML, "
                     "Llama 3, Gemma); Ollama reads tokenizer.chat_template from the GGUF where it can")
        warnings.append("Modelfile: the chat template was not translated to a Go TEMPLATE (not ChatML / Llama 3 / "
                        "Gemma shaped); the Modelfile says so")
    else:
        lines.append("# TEMPLATE omitted: the model has no chat template")
    generation = _generation_config(folder)
    eos = generation.get("eos_token_id", tok.eos_token_id)
    for token_id in eos if isinstance(eos, list) else [eos]:
        if token_id is not None:
            stops.append(tok.convert_ids_to_tokens(int(token_id)))
    for stop in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{stop}"')
    for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("repetition_penalty", "repeat_penalty")):
        if generation.get(key) is not None:
            lines.append(f"PARAMETER {name} {generation[key]}")
    return "\n".join(lines) + "\n", warnings


def write_modelfile(path: Path, gguf_name: str, folder: Path) -> list[str]:
    """Write the Modelfile to `path`; returns warnings."""
    text, warnings = modelfile_text(gguf_name, folder)
    Path(path).write_text(text, encoding="utf-8")
    return warnings


def _generation_config(folder: Path) -> dict:
    path = Path(folder) / "generation_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
