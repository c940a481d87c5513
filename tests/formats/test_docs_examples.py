"""docs/lora-formats.md's API example runs as written and does what the page says it does.

The page's Python block is executed on a tiny FLUX LoRA (its `state_dict` is the reader's: here a peft LoRA of a
tiny `FluxTransformer2DModel`, rank 32 and alpha 32 as the example's arguments say). What it writes must be a kohya
file with sd-scripts' metadata, and converting that file back must give every module the update it started with.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tests.formats.test_flux import DOUBLE, SINGLE_ATTN, random_lora, targets, tiny_flux  # noqa: E402

PAGE = Path(__file__).resolve().parents[2] / "docs" / "lora-formats.md"


def api_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text("utf-8"), flags=re.S | re.M)
    assert len(blocks) == 1, "the page has one Python example, its API block"
    return blocks[0]


def updates(sd: dict) -> dict[str, torch.Tensor]:
    """module → B·A of a diffusers LoRA (scale folded in)."""
    return {k[:-len(".lora_A.weight")]: sd[k.replace("lora_A", "lora_B")].float() @ sd[k].float()
            for k in sd if k.endswith(".lora_A.weight")}


def example_problems(code: str, state_dict: dict, folder: Path, monkeypatch) -> list[str]:
    """What is wrong with running ``code`` on ``state_dict`` in ``folder``: an exception, or a result that is not
    the page's (the file's metadata, the update of each module after the round trip)."""
    from lora_run_formats import read_metadata

    monkeypatch.chdir(folder)
    names: dict = {"state_dict": state_dict}
    try:
        exec(compile(code, str(PAGE), "exec"), names)        # noqa: S102 - the page's own example
    except Exception as exc:  # noqa: BLE001 - any failure of the example is the finding
        return [f"raised {type(exc).__name__}: {exc}"]
    problems = []
    meta = read_metadata(folder / "ohwx.safetensors")
    if meta.get("ss_network_module") != "networks.lora_flux" or meta.get("ss_output_name") != "ohwx":
        problems.append(f"metadata: {meta}")
    expected, got = updates(state_dict), updates(names["diffusers"])
    if set(got) != set(expected):
        problems.append(f"modules differ: {sorted(set(got) ^ set(expected))[:4]}")
    problems += [f"{module}: update differs" for module in sorted(set(got) & set(expected))
                 if not torch.allclose(got[module], expected[module], atol=1e-5, rtol=1e-4)]
    return problems


def test_the_api_example_runs_and_round_trips(tmp_path, monkeypatch):
    model = tiny_flux()
    sd = random_lora(model, targets(DOUBLE, SINGLE_ATTN), rank=32, alpha=32.0)   # fused qkv and linear1 parts
    code = api_example()
    assert "diffusers_to_kohya(state_dict, alpha=32.0, rank=32)" in code
    (tmp_path / "as-written").mkdir()
    assert example_problems(code, sd, tmp_path / "as-written", monkeypatch) == []
    # controls: a wrong scale and a wrong call are caught
    (tmp_path / "halved").mkdir()
    halved = example_problems(code.replace("alpha=32.0, rank=32", "alpha=16.0, rank=32"), sd, tmp_path / "halved",
                              monkeypatch)
    assert halved and all(p.endswith("update differs") for p in halved)
    (tmp_path / "positional").mkdir()
    positional = example_problems(code.replace('load_lora("ohwx.safetensors")[0]', 'load_lora("ohwx.safetensors")[0], '
                                               "False"), sd, tmp_path / "positional", monkeypatch)
    assert len(positional) == 1 and positional[0].startswith("raised TypeError")
