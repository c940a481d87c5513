"""bench/engine_models.py's HunyuanImage-2.1 layout against sd-scripts' own loaders (no files written: the
state dicts are meta tensors under the names the builder would write, and sd-scripts' loaders must accept
them with strict=True). Needs the pinned sd-scripts checkout and an interpreter with its requirements
(LORA_RUN_SD_SCRIPTS, LORA_RUN_ENGINE_PY; default /work/engines as in bench/engines_gpu.md); skipped without."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SD_SCRIPTS = Path(os.environ.get("LORA_RUN_SD_SCRIPTS", "/work/engines/sd-scripts"))
ENGINE_PY = Path(os.environ.get("LORA_RUN_ENGINE_PY", "/work/engines/venv/bin/python"))



def _engine_lacks() -> str | None:
    """Why the engine interpreter cannot run sd-scripts' HunyuanImage loaders (None: it can). A checkout of the
    engines with a bare venv (torch and build tools only, as bench/engines_gpu.md §1 makes it) is not a defect of
    the layout these tests check, so it skips them with the interpreter's own error."""
    if not (SD_SCRIPTS / "hunyuan_image_train_network.py").is_file() or not ENGINE_PY.is_file():
        return "no sd-scripts checkout / engine interpreter (bench/engines_gpu.md)"
    probe = subprocess.run([str(ENGINE_PY), "-c", "import torch, torchvision, transformers, tokenizers, safetensors"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{ENGINE_PY} lacks sd-scripts' requirements: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


LACKS = _engine_lacks()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(LACKS is not None, reason=LACKS or "")]

CHECK = r'''
import json, sys
sys.path.insert(0, sys.argv[1] + "/bench")
import engine_models as em
from pathlib import Path
cache = Path(sys.argv[3])
em._hunyuan_tokenizers(cache.parent / "tokenizers", cache)
import torch
from library import hunyuan_image_models, hunyuan_image_text_encoder as te, hunyuan_image_vae

mistake = sys.argv[4]
mods = em.hunyuan_modules(Path(sys.argv[2]))
files = {}
for name, mod in mods.items():
    keys = list(mod.state_dict().keys())
    names = keys if (mistake == "no-rename" and name in ("qwen", "byt5")) else em.hunyuan_file_keys(name, keys)
    files[name] = {n: torch.empty(t.shape, dtype=t.dtype, device="meta")
                   for n, t in zip(names, mod.state_dict().values())}
    if mistake == "full-dit" and name == "dit":   # a block of the full model that the reduced one lacks
        files[name]["double_blocks.19.img_attn_proj.weight"] = torch.empty((3584, 3584), device="meta")
result = {"blocks": [len(mods["dit"].double_blocks), len(mods["dit"].single_blocks)],
          "qwen_layers": len(mods["qwen"].model.language_model.layers), "keys": {k: len(v) for k, v in files.items()}}
failed = {}
def attempt(name, fn):
    try:
        fn()
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"[:300]
attempt("qwen", lambda: te.load_qwen2_5_vl(None, None, "meta", state_dict=dict(files["qwen"])))
attempt("byt5", lambda: te.load_byt5(None, None, "meta", state_dict=dict(files["byt5"])))
def dit():   # what load_hunyuan_image_model does with the file it read
    hunyuan_image_models.create_model("torch", False, None).load_state_dict(files["dit"], strict=True, assign=True)
attempt("dit", dit)
def vae():   # load_vae: HunyuanVAE2D() + strict load
    with torch.device("meta"):
        hunyuan_image_vae.HunyuanVAE2D().load_state_dict(files["vae"], strict=True, assign=True)
attempt("vae", vae)
result["failed"] = failed
print("RESULT " + json.dumps(result))
'''


def _check(tmp_path: Path, env_extra: dict[str, str], mistake: str = "") -> dict:
    cache = tmp_path / "hf-cache"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", **env_extra,
               PYTHONPATH=os.pathsep.join([str(ROOT / "bench" / "engine_shim"), str(SD_SCRIPTS)]))
    proc = subprocess.run([str(ENGINE_PY), "-c", CHECK, str(ROOT), str(SD_SCRIPTS), str(cache), mistake],
                          capture_output=True, text=True, env=env, timeout=600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line[-1][len("RESULT "):])


def test_reduced_hunyuan_layout_is_what_sd_scripts_loads_strictly(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import engine_models
    finally:
        sys.path.remove(str(ROOT / "bench"))
    env = engine_models.hunyuan_env(1, 1, 2, 1)
    assert env == {"LORA_RUN_HY_BLOCKS": "1,1", "LORA_RUN_QWEN_LAYERS": "2,1"}
    got = _check(tmp_path, env)
    assert got["failed"] == {}
    assert got["blocks"] == [1, 1] and got["qwen_layers"] == 2
    # planted mistakes the engine must refuse: the text encoders' state names without the builder's inverse
    # renames (sd-scripts renames model.* → model.language_model.* and pops shared.weight), and a DiT file
    # with a block the reduced model does not have
    bad = _check(tmp_path, env, "no-rename")
    assert set(bad["failed"]) == {"qwen", "byt5"}
    assert "shared.weight" in bad["failed"]["byt5"] and "Missing key" in bad["failed"]["qwen"]
    bad = _check(tmp_path, env, "full-dit")
    assert set(bad["failed"]) == {"dit"} and "double_blocks.19" in bad["failed"]["dit"]


def test_without_the_shim_variables_the_engine_keeps_its_full_sizes(tmp_path):
    got = _check(tmp_path, {})
    assert got["failed"] == {}
    assert got["blocks"] == [20, 40] and got["qwen_layers"] == 28
