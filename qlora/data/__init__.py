"""Training data from the user's files: rows, formats, tokens, batches. Knows no model, only tokenizers.

    rows.py        reading files / folders / Hub data sets into rows, format matching, seeded splits and subsets
    sft.py         chat / instruction rows -> input ids and labels (the loss on the answers), packing, collate
    preference.py  preference pairs -> TRL's prompt / chosen / rejected ids, truncation, collate
"""
