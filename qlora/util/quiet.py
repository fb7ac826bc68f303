"""Log lines qlora's users cannot act on, dropped at their source loggers (installed by `import qlora`).

- bitsandbytes, on CPUs with AVX512-BF16, tries to fetch a gemm kernel from the Hugging Face Hub when it is
  imported and warns when it cannot (offline, or without the `kernels` package); its own fallback, which we
  use, runs instead. With the `kernels` package installed and the Hub offline (HF_HUB_OFFLINE=1, as the
  bundled models set it), `kernels` warns that it skips the kernel's publisher trust check instead.
- torch's FakeTensorMode logs the traceback of an op that fails on fake tensors before raising it; the
  planner catches such failures (a shape the model cannot run, e.g. a sequence longer than its positions)
  and answers "does not fit" in one line.
"""
from __future__ import annotations

import logging

NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "torch._subclasses.fake_tensor": "failed while attempting to run meta for",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/",
}


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_known_noise() -> None:
    for name, prefix in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefix))
