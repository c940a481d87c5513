"""Load LoRA files with ComfyUI's own code, in a process of its own (run by ``test_comfyui_loader.py``).

    python comfyui_probe.py <comfyui checkout> <job.json> <out folder>

``job.json``: ``{"model": <diffusion-model .safetensors>, "clip_l": null or {"file": <CLIP-L .safetensors>,
"config": <its transformers config>}, "loras": {name: {"file": <LoRA .safetensors>, "expected": <its ΔW in the
model file's layout, .safetensors>}}}``. ComfyUI runs as with ``--cpu``. The model is loaded the way its "Load
Diffusion Model" node does (``comfy.sd.load_diffusion_model_state_dict``: layout and config detected from the
tensors); a CLIP-L, when given, as ComfyUI's ``SD1ClipModel`` (the ``clip_l`` module FLUX.1's text encoders
hold) with the file's config; each LoRA the way its "LoraLoader" node does (``comfy.sd.load_lora_for_models``),
and the weight ComfyUI would compute for every patched tensor is taken from
``ModelPatcher.patch_weight_to_device``.
Written to ``out``: ``report.json`` (model class, detected config, per LoRA its warnings and patched keys),
``<name>.delta.safetensors`` (patched − original weight per model key) and ``<name>.expected.safetensors`` (the
expected ΔW renamed by the model config's own ``process_unet_state_dict``, as ComfyUI renames a checkpoint's
tensors when it loads them).

ComfyUI imports torchvision, torchaudio and av at module level for models not used here; where the installed
package does not import (a CPU-only torch with a CUDA torchvision), an inert stand-in is put in its place and the
report lists it. This file is lora-run's; no ComfyUI code is copied into it.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import logging
import sys
import types
from pathlib import Path


class _Absent:
    """Any attribute of a stand-in package; calling it fails with the package's name."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, key: str) -> "_Absent":
        if key.startswith("__"):
            raise AttributeError(key)
        return _Absent(f"{self._name}.{key}")

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self._name}: not available in this environment")


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name, path, target=None):  # noqa: ANN001 - importlib's signature
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        module = types.ModuleType(spec.name)

        def attribute(key: str, _name: str = spec.name) -> _Absent:
            if key.startswith("__"):
                raise AttributeError(key)
            return _Absent(f"{_name}.{key}")

        module.__getattr__ = attribute
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


def _import_comfy(checkout: Path) -> list[str]:
    import diffusers  # noqa: F401 - their optional-package probes run before any stand-in exists
    import transformers  # noqa: F401

    absent = []
    for root in ("torchvision", "torchaudio", "av"):
        try:
            __import__(root)
        except Exception:  # noqa: BLE001 - any failure to import means "not usable here"
            for name in [m for m in sys.modules if m == root or m.startswith(root + ".")]:
                del sys.modules[name]
            absent.append(root)
    if absent:
        sys.meta_path.insert(0, _StandIns(set(absent)))
    sys.path.insert(0, str(checkout))
    from comfy.cli_args import args

    args.cpu = True
    return absent


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


def main(checkout: Path, job_path: Path, out: Path) -> None:
    absent = _import_comfy(checkout)
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.sd
    import comfy.utils

    job = json.loads(job_path.read_text())
    log = _Collect()
    logging.getLogger().addHandler(log)
    logging.getLogger().setLevel(logging.INFO)
    patcher = comfy.sd.load_diffusion_model_state_dict(load_file(job["model"]),
                                                        model_options={"dtype": torch.float32})
    report: dict = {"stand_ins": absent, "model_warnings": list(log.messages), "loras": {}}
    if patcher is None:
        report["model_class"] = None
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return
    model = patcher.model
    report["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    report["model_config"] = type(model.model_config).__name__
    report["unet_config"] = {k: v for k, v in model.model_config.unet_config.items()
                             if isinstance(v, (int, float, str, bool, list, type(None)))}
    report["model_keys"] = sorted(model.state_dict())
    cpu = torch.device("cpu")
    clip = None
    if job.get("clip_l"):
        import comfy.sd1_clip
        import comfy.supported_models_base

        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "return_projected_pooled": False,
                         "textmodel_json_config": job["clip_l"]["config"]}
        log.messages.clear()
        clip = comfy.sd.CLIP(target, state_dict=[load_file(job["clip_l"]["file"])],
                             model_options={"dtype": torch.float32})
        report["clip_warnings"] = list(log.messages)
    for name, files in job["loras"].items():
        expected = model.model_config.process_unet_state_dict(load_file(files["expected"]))
        expected = {f"diffusion_model.{k}": v.contiguous() for k, v in expected.items()}
        if files.get("expected_clip_l"):                       # already in ComfyUI's CLIP names
            expected.update(load_file(files["expected_clip_l"]))
        save_file(expected, str(out / f"{name}.expected.safetensors"))
        log.messages.clear()
        lora = comfy.utils.load_torch_file(files["file"], safe_load=True)
        patched, patched_clip = comfy.sd.load_lora_for_models(patcher, clip, lora, 1.0, 1.0)
        deltas = {}
        for p in [patched] + ([patched_clip.patcher] if patched_clip is not None else []):
            for key in sorted(p.patches):
                before = comfy.utils.get_attr(p.model, key).detach().to(torch.float32).clone()
                after = p.patch_weight_to_device(key, device_to=cpu, return_weight=True)
                deltas[key] = (after.to(torch.float32) - before).contiguous()
        save_file(deltas, str(out / f"{name}.delta.safetensors"))
        report["loras"][name] = {"file": files["file"], "keys": len(lora), "warnings": list(log.messages), "patched": sorted(deltas)}
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
