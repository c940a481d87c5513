"""`lora_run_formats.lora_check` on headers alone (no file, no torch): what forms a LoRA and what fits a model's
layers; the CLI's refusals are tests/reliability/test_lora_check.py."""
from __future__ import annotations

from lora_run_formats.lora_check import fit_problem, structure_problem


def header(**shapes) -> dict:
    """A checked header's shape of things: ``name=shape`` (``__`` for ``.``)."""
    return {k.replace("__", "."): {"dtype": "F32", "shape": list(v), "data_offsets": [0, 0]} for k, v in shapes.items()}


def test_what_forms_a_lora():
    ok = header(m__lora_down__weight=(4, 64), m__lora_up__weight=(32, 4), m__alpha=())
    assert structure_problem(ok) is None
    assert structure_problem(header(m__lora_A__weight=(4, 64), m__lora_B__weight=(32, 4))) is None
    assert structure_problem(header(m__lora_down__weight=(4, 64), m__lora_up__weight=(32, 4), m__alpha=(1,))) is None
    cases = {"its ranks disagree": header(m__lora_A__weight=(4, 64), m__lora_B__weight=(32, 8)),
             "has lora_A.weight but not the up": header(m__lora_A__weight=(4, 64)),
             "has alpha but not the down": header(m__alpha=()),
             "not a matrix (outputs × rank)": header(m__lora_A__weight=(4, 64), m__lora_B__weight=(32, 4, 1, 1)),
             "has rank 0": header(m__lora_A__weight=(0, 64), m__lora_B__weight=(32, 0)),
             "its alpha has shape [4], not one number": header(m__lora_down__weight=(4, 64),
                                                                m__lora_up__weight=(32, 4), m__alpha=(4,))}
    for says, bad in cases.items():
        why = structure_problem(bad)
        assert why is not None and why.startswith("module m: ") and says in why, (says, why)
    two = structure_problem(header(a__lora_A__weight=(4, 64), b__lora_A__weight=(4, 64), c__lora_A__weight=(4, 64),
                                   c__lora_B__weight=(64, 4)))
    assert two.startswith("module a: ") and two.endswith("(and 1 more modules)"), two
    assert structure_problem(header(other=(3,), m__dora_scale=(1, 64))) is None       # left to the loaders
    conv = header(m__lora_down__weight=(4, 64, 3, 3), m__lora_up__weight=(32, 4, 1, 1))   # a Conv2d LoRA (peft, LyCORIS)
    assert structure_problem(conv) is None
    assert "its ranks disagree" in structure_problem(header(m__lora_down__weight=(4, 64, 3, 3),
                                                            m__lora_up__weight=(32, 8, 1, 1)))


def targets(module):
    return {"fused": ("transformer", ("q", "k", "mlp")), "te": ("text_encoder", ("text_model.l",))}.get(
        module, ("transformer", (module,)))


LAYERS = {"transformer": {"q": [64, 64], "k": [64, 64], "mlp": [256, 64], "p": [64, 256], "norm": [64],
                          "packed": None},
          "text_encoder": {"l": [32, 32]}}


def test_what_fits_the_model():
    fits = header(p__lora_down__weight=(4, 256), p__lora_up__weight=(64, 4), fused__lora_down__weight=(8, 64),
                  fused__lora_up__weight=(384, 8), te__lora_A__weight=(2, 32), te__lora_B__weight=(32, 2),
                  packed__lora_A__weight=(2, 7), packed__lora_B__weight=(9, 2), unknown__lora_A__weight=(2, 7),
                  unknown__lora_B__weight=(9, 2))
    assert fit_problem(fits, lambda m: None if m == "unknown" else targets(m), LAYERS) is None
    assert fit_problem(fits, targets, {}) is None                       # no layers known: nothing compared
    cases = {"its matrices are transposed": header(p__lora_down__weight=(256, 4), p__lora_up__weight=(4, 64)),
             "lora_down.weight is [4, 128] (128 inputs), but transformer.p takes 256 inputs":
                 header(p__lora_down__weight=(4, 128), p__lora_up__weight=(64, 4)),
             "lora_up.weight is [383, 8] (383 outputs), but transformer.q … mlp (3 fused parts) gives 384 outputs":
                 header(fused__lora_down__weight=(8, 64), fused__lora_up__weight=(383, 8)),
             "names the layer transformer.x, which this model does not have":
                 header(x__lora_down__weight=(4, 64), x__lora_up__weight=(64, 4)),
             "names transformer.norm, which is not a linear layer":
                 header(norm__lora_down__weight=(4, 64), norm__lora_up__weight=(64, 4))}
    for says, bad in cases.items():
        why = fit_problem(bad, targets, LAYERS)
        assert why is not None and says in why, (says, why)
    conv = header(p__lora_down__weight=(4, 256, 3, 3), p__lora_up__weight=(64, 4, 1, 1))
    assert fit_problem(conv, targets, LAYERS) is None          # a Conv2d LoRA: left to its loader
    broken = fit_problem(header(p__lora_down__weight=(4, 128), p__lora_up__weight=(64, 4)),
                         lambda m: 1 / 0, LAYERS)            # a family's name mapping that fails: not judged
    assert broken is None
