"""qlora.util.checks: the one rule (and wording) of integer, number and true/false fields."""
from dataclasses import dataclass

import pytest

from qlora.errors import QLoRAError
from qlora.lora.config import LoraConfig
from qlora.plan.settings import RunSettings
from qlora.train.config import TrainConfig
from qlora.util.checks import check_bools, check_ints, check_numbers, must_be_int, must_be_number


@dataclass
class F:
    v: object


@pytest.mark.parametrize("kwargs, good, bad, message", [
    (dict(), [1, 7], [0, -1, 1.0, True, "2", None], "must be an integer >= 1"),
    (dict(minimum=0), [0, 3], [-1, False], "must be an integer >= 0"),
    (dict(minimum=None), [-5, 0], [1.5, True, None], "must be an integer"),
    (dict(null="off"), [None, 2], [0, "off"], "must be null (off) or an integer >= 1"),
    (dict(minimum=0, null=""), [None, 0], [-1], "must be null or an integer >= 0"),
])
def test_check_ints(kwargs, good, bad, message):
    for v in good:
        check_ints(F(v), ("v",), **kwargs)
        assert must_be_int(v, **kwargs) is None
    for v in bad:
        with pytest.raises(QLoRAError) as e:
            check_ints(F(v), ("v",), **kwargs)
        assert str(e.value) == f"v={v!r}: {message}"
        assert "must be " + must_be_int(v, **kwargs) == message


@pytest.mark.parametrize("kwargs, good, bad, message", [
    (dict(above=0), [1e-9, 3], [0, -1, True, "1", None, float("nan")], "must be a number > 0"),
    (dict(at_least=0), [0, 0.5], [-0.1, False], "must be a number >= 0"),
    (dict(at_least=0, below=1), [0, 0.99], [1, 1.5, -0.01], "must be a number in [0, 1)"),
    (dict(above=0, below=0.5), [0.25], [0, 0.5], "must be a number in (0, 0.5)"),
    (dict(above=0, null="no clipping"), [None, 1.0], [0, "x"], "must be null (no clipping) or a number > 0"),
    (dict(above=0, hint="typical: r or 2·r"), [16], [0], "must be a number > 0 (typical: r or 2·r)"),
    (dict(), [0, -2.5], [True, [1]], "must be a number"),
])
def test_check_numbers(kwargs, good, bad, message):
    for v in good:
        check_numbers(F(v), ("v",), **kwargs)
    for v in bad:
        with pytest.raises(QLoRAError) as e:
            check_numbers(F(v), ("v",), **kwargs)
        assert str(e.value) == f"v={v!r}: {message}"
    rule = {k: w for k, w in kwargs.items() if k != "hint"}
    assert all(must_be_number(v, **rule) is None for v in good)


def test_check_bools():
    check_bools(F(True), ("v",))
    check_bools(F(False), ("v",))
    for v in (0, 1, "yes", None):
        with pytest.raises(QLoRAError) as e:
            check_bools(F(v), ("v",))
        assert str(e.value) == f"v={v!r}: must be true or false"


@pytest.mark.parametrize("make, message", [
    (lambda: LoraConfig(r=0), "r=0: the LoRA rank must be an integer >= 1 (typical: 8, 16, 64)"),
    (lambda: LoraConfig(lora_alpha=0), "lora_alpha=0: must be a number > 0 (typical: r or 2·r)"),
    (lambda: LoraConfig(lora_dropout=1.0), "lora_dropout=1.0: must be a number in [0, 1)"),
    (lambda: TrainConfig(max_grad_norm=0),
     "max_grad_norm=0: must be null (no clipping) or a number > 0"),
    (lambda: TrainConfig(seed=1.5), "seed=1.5: must be an integer"),
    (lambda: TrainConfig(fsdp="yes"), "fsdp='yes': must be true or false"),
    (lambda: RunSettings(checkpoint_blocks=-1),
     "checkpoint_blocks=-1: must be null (every block) or an integer >= 0"),
    (lambda: RunSettings(offload_activations=1), "offload_activations=1: must be true or false"),
])
def test_the_configs_use_them(make, message):
    with pytest.raises(QLoRAError) as e:
        make()
    assert str(e.value) == message
