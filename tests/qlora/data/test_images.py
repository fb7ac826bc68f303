"""Tests of chat rows with images (qlora.data.images through qlora.data.sft): labels, image tokens, batching, cuts,
bad input.

    .venv/bin/python -m pytest -q tests/qlora/data/test_images.py      (~30 s)

Two families built offline (tests/qlora/data/tiny_vlm.py): LLaVA (a fixed 16 x 16 crop: 4 tokens per picture)
and Gemma 3 (its processor inserts text and boundary tokens around 4 soft image tokens and returns token_type_ids,
a per-token tensor; its logits are soft-capped, so its loss is the model's own); the batching test also runs
LLaVA-NeXT, whose pictures of different shapes become different numbers of tiles (pixel_values padded on axis 1). References:
the assistant tokens found by token ids (`<|im_start|>assistant\\n` ... `<|im_end|>`, test_sft's reference); the
image-token count from the picture sizes; a batch's per-row losses against each row run alone through the
processor's own call and the model's own forward (no qlora collate).
"""
import base64
import io
import json

import pytest
import torch
from PIL import Image

from qlora.data import images
from qlora.data.rows import Row, read_rows
from qlora.data.sft import IGNORE, Encoder, collate, detect_format, encode_rows, pack, parse_row
from qlora.errors import QLoRAError
from tests.qlora.data.test_sft import reference_assistant_mask
from tests.qlora.data.tiny_vlm import model_for, processor_for, tokens_per_image, write_pictures

FAMILIES = ("llava", "gemma3")
SIZES = {"a.png": (32, 32), "b.png": (16, 48), "c.png": (48, 32)}

pytestmark = pytest.mark.usefixtures("single_thread")


def image_chat(*names, question="What is this?", answer="A small feline."):
    return [{"role": "user", "content": [*({"type": "image", "path": n} for n in names), {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tok_dir):
    folder = tmp_path_factory.mktemp("pictures")
    write_pictures(folder, SIZES)
    procs = {f: processor_for(f, smol_tok_dir) for f in (*FAMILIES, "llava_next")}
    return {"folder": folder, "processors": procs, "models": {f: model_for(f, p) for f, p in procs.items()}}


def encode(setup, family, rows, max_length=512):
    proc = setup["processors"][family]
    return encode_rows(rows, detect_format(rows), Encoder(proc.tokenizer, processor=proc), max_length)


def row(setup, data, n=1):
    return Row(f"rows.jsonl:{n}", data, setup["folder"])


# ---------------------------------------------------------------- labels and image tokens

@pytest.mark.parametrize("family", FAMILIES)
def test_labels_on_assistant_tokens_only_and_image_tokens_as_expanded(setup, family):
    proc = setup["processors"][family]
    chat = image_chat("a.png", "b.png") + [{"role": "user", "content": "And this one?"},
                                           {"role": "assistant", "content": "A domestic canine."}]
    (ex,), stats = encode(setup, family, [row(setup, {"messages": chat})])
    ids = ex["input_ids"]
    want = reference_assistant_mask(proc.tokenizer, ids)
    assert [y != IGNORE for y in ex["labels"]] == want and sum(want) > 0
    assert all(y == t for t, y in zip(ids, ex["labels"]) if y != IGNORE)
    learned = proc.tokenizer.decode([t for t, y in zip(ids, ex["labels"]) if y != IGNORE])
    assert learned == "A small feline.<|im_end|>A domestic canine.<|im_end|>"
    expected = sum(tokens_per_image(family, *SIZES[n]) for n in ("a.png", "b.png"))
    image_id = proc.tokenizer.image_token_id
    assert ids.count(image_id) == expected
    last = max(i for i, t in enumerate(ids) if t == image_id)      # + the processor's end-of-image tokens
    assert last < ex["media_end"] <= last + (1 if family == "llava" else 4)
    assert stats.images == 1 and stats.kept == 1
    # an example holds its pictures' sources, not their pixels (the processor runs again per batch)
    assert ex["pictures"].sources == ("a.png", "b.png") and not any(torch.is_tensor(v) for v in ex.values())
    if family == "gemma3":        # per-token tensors follow the tokens (1 on image tokens), pictures 32 x 32
        batch = collate([ex], pad_id=2)
        assert batch["token_type_ids"][0].tolist() == [int(t == proc.tokenizer.image_token_id) for t in ids]
        assert batch["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_on_all_learns_every_token_but_the_image_ones(setup, family):
    """train_on=all: every token is learned but the first and the image's (its placeholder, its tokens and what
    the processor added around them); all text after the image is learned."""
    proc = setup["processors"][family]
    r = row(setup, {"messages": image_chat("a.png")})
    (ex,), _ = encode_rows([r], "messages", Encoder(proc.tokenizer, processor=proc, train_on="all"), 512)
    ids, labels, end = ex["input_ids"], ex["labels"], ex["media_end"]
    image_ids = {proc.tokenizer.image_token_id, proc.image_token_id}
    first = min(i for i, t in enumerate(ids) if t in image_ids)
    ignored = [i for i, y in enumerate(labels) if y == IGNORE]
    assert ignored[0] == 0 and all(first - 2 <= i < end for i in ignored[1:])
    assert all(labels[i] == IGNORE for i, t in enumerate(ids) if t in image_ids)
    assert labels[end:] == ids[end:] and labels[1:first - 2] == ids[1:first - 2]


def test_images_column_trl_layout_and_string_messages(setup):
    """TRL's layout: bare image parts paired with the `images` column in order (paths, or what a Hub data set
    gives: decoded pictures, {"bytes", "path"}); string messages + images get the pictures before the first user
    text; a data: URL and an `image` path per part. All give the ids and pixels of explicit per-part paths."""
    proc = setup["processors"]["llava"]
    explicit = row(setup, {"messages": image_chat("a.png", "c.png")})
    bare = row(setup, {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                 {"type": "text", "text": "What is this?"}]},
                                    {"role": "assistant", "content": "A small feline."}],
                       "images": ["a.png", "c.png"]})
    plain = row(setup, {"messages": [{"role": "user", "content": "What is this?"},
                                     {"role": "assistant", "content": "A small feline."}], "images": ["a.png", "c.png"]})
    a_png, c_png = ((setup["folder"] / n).read_bytes() for n in ("a.png", "c.png"))
    decoded = row(setup, {**bare.data, "images": [Image.open(io.BytesIO(a_png)), {"bytes": c_png, "path": None}]})
    url = row(setup, {"messages": [{"role": "user", "content": [
        {"type": "image", "url": "data:image/png;base64," + base64.b64encode(a_png).decode()},
        {"type": "image", "image": str(setup["folder"] / "c.png")}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A small feline."}]})
    out, _ = encode(setup, "llava", [explicit, bare, plain, decoded, url])
    for ex in out[1:]:
        assert ex["input_ids"] == out[0]["input_ids"]
        torch.testing.assert_close(collate([ex], 2)["pixel_values"], collate([out[0]], 2)["pixel_values"])
    assert out[0]["input_ids"].count(proc.tokenizer.image_token_id) == 8


def test_csv_rows_hold_messages_with_images_as_json_text(setup, tmp_path):
    import csv
    write_pictures(tmp_path, {"p.png": (16, 16)})
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(image_chat("p.png"))]])
    rows = read_rows(str(tmp_path / "rows.csv"))
    assert images.mentions_images(rows[0])
    out, stats = encode(setup, "llava", rows)
    assert stats.images == 1 and collate(out, 2)["pixel_values"].shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- batching = each row alone

@pytest.mark.parametrize("family", [*FAMILIES, "llava_next"])
def test_batch_of_different_image_counts_and_sizes_equals_each_row_alone(setup, family):
    proc, model = setup["processors"][family], setup["models"][family]
    rows = [row(setup, {"messages": image_chat("a.png")}, 1),
            row(setup, {"messages": image_chat("b.png", "c.png", question="Which is bigger?", answer="The second.")}, 2),
            row(setup, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}, 3),
            row(setup, {"messages": image_chat("b.png", question="And this?")}, 4)]
    examples, _ = encode(setup, family, rows)
    if family == "llava_next":    # 5 tiles for a 32 x 32 picture, 3 for 16 x 48: the batch pads them
        assert [tuple(collate([ex], 2)["pixel_values"].shape) for ex in examples if "pictures" in ex] == [
            (1, 5, 3, 16, 16), (2, 5, 3, 16, 16), (1, 3, 3, 16, 16)]
    batch = collate(examples, pad_id=2)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        got = [torch.nn.functional.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=IGNORE)
               for i in range(len(rows))]
        for i, (r, ex) in enumerate(zip(rows, examples)):       # each alone: the processor's own call
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                         else [{k: v for k, v in p.items() if k != "path"} for p in m["content"]]}
                        for m in r.data["messages"]]
            text = proc.apply_chat_template(messages, tokenize=False)
            names = [p["path"] for m in r.data["messages"] if isinstance(m["content"], list) for p in m["content"]
                     if p["type"] == "image"]
            pictures = [Image.open(setup["folder"] / n).convert("RGB") for n in names] or None
            alone = proc(text=text, images=pictures, add_special_tokens=False, return_tensors="pt")
            assert alone["input_ids"][0].tolist() == ex["input_ids"]
            labels = torch.tensor([ex["labels"]])
            want = model(**alone, labels=labels).loss
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    # the chunked loss (the model's base model with the images) equals the model's own loss on the batch
    from qlora.objectives.losses import causal_lm_loss
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                                  chunk_size=7, **media),
                                   model(**batch).loss, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- max_length never cuts image tokens

@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_that_would_lose_image_tokens_drops_the_row(setup, family):
    question = "Look closely at this picture and say, in a few words, what it shows: "
    chat = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image", "path": "a.png"}]},
            {"role": "assistant", "content": "A small feline with soft fur and a long tail."}]
    (full,), _ = encode(setup, family, [row(setup, {"messages": chat})])
    end, n = full["media_end"], len(full["input_ids"])
    (cut,), stats = encode(setup, family, [row(setup, {"messages": chat})], max_length=n - 3)
    assert stats.cut == 1 and stats.dropped == 0 and cut["input_ids"] == full["input_ids"][:n - 3]
    assert all(v.shape == (1, n - 3) for k, v in collate([cut], 2).items() if k in ("token_type_ids", "labels"))
    rows = [row(setup, {"messages": chat}), row(setup, {"messages": [{"role": "user", "content": "Hi"},
                                                                    {"role": "assistant", "content": "Hello."}]})]
    kept, stats = encode(setup, family, rows, max_length=end - 1)
    assert stats.dropped == 1 and stats.kept == 1 and "pictures" not in kept[0]
    assert "1 dropped" in stats.line("train", end - 1)


def test_packing_refuses_rows_with_images(setup):
    examples, _ = encode(setup, "llava", [row(setup, {"messages": image_chat("a.png")})])
    with pytest.raises(QLoRAError, match="packing=true cannot pack examples with images.*packing=false"):
        pack(examples, 512)


# ---------------------------------------------------------------- bad input: one line naming the row

def bad(setup, data, processor="llava", where=None):
    proc = setup["processors"][processor] if processor else None
    tok = setup["processors"]["llava"].tokenizer
    r = row(setup, data, 7) if where is None else where
    with pytest.raises(QLoRAError) as e:
        Encoder(tok, processor=proc)(r, parse_row(r, detect_format([r]), True))
    message = str(e.value)
    assert "\n" not in message and message.startswith("rows.jsonl:7: ")
    return message


def test_bad_image_input_is_one_line_naming_the_row(setup, tmp_path):
    (setup["folder"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert "image file" in bad(setup, {"messages": image_chat("missing.png")}) and "not found" in bad(
        setup, {"messages": image_chat("missing.png")})
    assert "cannot read the image 'broken.png'" in bad(setup, {"messages": image_chat("broken.png")})
    assert "no image processor" in bad(setup, {"messages": image_chat("a.png")}, processor=None)
    assert "no image processor" in bad(setup, {"messages": image_chat(), "images": ["a.png"]}, processor=None)
    assert "2 picture(s) in the images column" in bad(
        setup, {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                             {"role": "assistant", "content": "A."}], "images": ["a.png", "b.png"]})
    assert "content[0] must be" in bad(setup, {"messages": [{"role": "user", "content": [{"type": "audio"}]},
                                                            {"role": "assistant", "content": "A."}]})


def test_more_images_than_the_processor_places_is_one_line(setup, smol_tok_dir):
    """A processor whose template gives images no placeholder refuses the pictures (transformers' own check)."""
    no_slots = processor_for("llava", smol_tok_dir, template=TEMPLATE_WITHOUT_IMAGES)
    r = row(setup, {"messages": image_chat("a.png", "b.png")}, 7)
    with pytest.raises(QLoRAError, match=r"^rows.jsonl:7: the model's processor refused the row's 2 image\(s\)"):
        Encoder(no_slots.tokenizer, processor=no_slots)(r, parse_row(r, "messages", True))


TEMPLATE_WITHOUT_IMAGES = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_relative_paths_start_at_the_data_file(setup, tmp_path):
    data = tmp_path / "sub" / "rows.jsonl"
    data.parent.mkdir()
    write_pictures(data.parent, {"p.png": (16, 16)})
    data.write_text(json.dumps({"messages": image_chat("p.png")}) + "\n")
    rows = read_rows(str(data))
    assert rows[0].folder == data.parent and images.mentions_images(rows[0])
    out, stats = encode(setup, "llava", rows)
    assert stats.images == 1 and collate(out, 2)["pixel_values"].shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- preference pairs with image prompts

@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_pairs_with_image_prompts_score_as_each_sequence_alone(setup, family):
    from qlora.data.preference import collate as pair_collate
    from qlora.data.preference import encode_pairs
    from qlora.objectives.preference import media_inputs, sequence_logps
    proc, model = setup["processors"][family], setup["models"][family]
    prompts = [image_chat("a.png")[:1], image_chat("b.png", "c.png", question="Which?")[:1],
               [{"role": "user", "content": "Hi"}]]
    answers = [("A cat.", "A dog."), ("The second.", "Neither of them."), ("Hello.", "Go away.")]
    rows = [row(setup, {"prompt": p, "chosen": [{"role": "assistant", "content": c}], "rejected": r}, i + 1)
            for i, (p, (c, r)) in enumerate(zip(prompts, answers))]
    examples, stats = encode_pairs(rows, "preference", proc.tokenizer, max_length=512, processor=proc)
    assert stats.kept == 3 and examples[1]["prompt_ids"].count(proc.tokenizer.image_token_id) == sum(
        tokens_per_image(family, *SIZES[n]) for n in ("b.png", "c.png"))
    batch = pair_collate(examples, pad_id=2, max_length=512)
    with torch.no_grad():
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                  chunk_size=5, **media_inputs(batch))
        for i, (p, ex) in enumerate(zip(prompts, examples)):
            names = [part["path"] for m in p if isinstance(m["content"], list) for part in m["content"]
                     if part["type"] == "image"]
            pictures = [Image.open(setup["folder"] / n).convert("RGB") for n in names] or None
            for j, response in enumerate(answers[i]):
                messages = [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                             else [{k: v for k, v in part.items() if k != "path"} for part in m["content"]]}
                            for m in p + [{"role": "assistant", "content": response}]]
                alone = proc(text=proc.apply_chat_template(messages, tokenize=False), images=pictures,
                             add_special_tokens=False, return_tensors="pt")
                response_ids = ex["chosen_ids" if j == 0 else "rejected_ids"]
                assert alone["input_ids"][0].tolist() == ex["prompt_ids"] + response_ids
                k = len(response_ids)
                logits = model(**alone).logits[0, -k - 1:-1].float()
                want = logits.log_softmax(-1).gather(-1, alone["input_ids"][0, -k:, None]).sum()
                torch.testing.assert_close(logps[i + j * len(examples)], want, rtol=1e-5, atol=1e-4)


def test_dpo_image_pairs_whose_prompt_start_would_be_cut_are_dropped(setup):
    from qlora.data.preference import encode_pairs
    proc = setup["processors"]["llava"]
    r = row(setup, {"prompt": image_chat("a.png")[:1], "chosen": "A cat.", "rejected": "A dog."})
    (ex,), _ = encode_pairs([r], "preference", proc.tokenizer, max_length=512, processor=proc)
    n = len(ex["prompt_ids"])
    _, stats = encode_pairs([r], "preference", proc.tokenizer, max_length=512, max_prompt_length=n - 1, processor=proc)
    assert stats.dropped == 1 and stats.kept == 0
    _, stats = encode_pairs([r], "preference", proc.tokenizer, max_length=n + 1, truncation_mode="keep_end",
                            processor=proc)
    assert stats.dropped == 1
    with pytest.raises(QLoRAError, match="rows.jsonl:1: the row has images, but the model has no image processor"):
        encode_pairs([r], "preference", proc.tokenizer, max_length=512)
    in_response = row(setup, {"prompt": image_chat()[:1], "chosen": image_chat("a.png")[:1], "rejected": "No."})
    with pytest.raises(QLoRAError, match="rows.jsonl:1: image parts belong in the prompt, not in chosen / rejected"):
        encode_pairs([in_response], "preference", proc.tokenizer, max_length=512, processor=proc)


def test_dpo_implicit_prompt_conversations_share_their_image_turn(setup):
    """chosen / rejected as whole conversations (TRL's implicit prompt): the shared user turn with its picture is
    the prompt, as if given explicitly."""
    from qlora.data.preference import encode_pairs
    proc = setup["processors"]["llava"]
    turn = image_chat("a.png")[:1]
    explicit = row(setup, {"prompt": turn, "chosen": [{"role": "assistant", "content": "A cat."}],
                           "rejected": [{"role": "assistant", "content": "A dog."}]})
    implicit = row(setup, {"chosen": turn + [{"role": "assistant", "content": "A cat."}],
                           "rejected": turn + [{"role": "assistant", "content": "A dog."}]})
    (a,), _ = encode_pairs([explicit], "preference", proc.tokenizer, max_length=512, processor=proc)
    (b,), _ = encode_pairs([implicit], "implicit_prompt", proc.tokenizer, max_length=512, processor=proc)
    assert a["prompt_ids"] == b["prompt_ids"] and a["chosen_ids"] == b["chosen_ids"]
    assert a["prompt_ids"].count(proc.tokenizer.image_token_id) == 4
