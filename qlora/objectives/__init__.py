"""Training objectives that never hold the full [tokens, vocab] logits.

    losses.py      causal-LM cross-entropy with the head in chunks (causal_lm_loss), the MoE router's aux loss
    preference.py  sequence log-probs in chunks, DPO and relatives on one base (preference_step), reference log-probs
    grpo.py        group-relative advantages and the clipped policy loss (GRPO, Dr. GRPO, DAPO, BNPO), = TRL's
    rollout.py     Sampler: completions sampled from the trained model itself (online RL), one interface
"""
