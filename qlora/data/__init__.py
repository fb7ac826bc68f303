"""Training data from the user's files: rows, formats, tokens, batches. Knows no model, only tokenizers
(and an image-text model's processor).

    rows.py        reading files / folders / Hub data sets into rows, format matching, seeded splits and subsets
    sft.py         chat / instruction rows -> input ids and labels (the loss on the answers), packing, collate
    preference.py  preference pairs -> TRL's prompt / chosen / rejected ids, truncation, collate
    images.py      image parts of chat rows: reading pictures, the processor's image tokens and tensors, batching
"""
