"""The LoRA files an engine writes, checked before lora-run reports one as the run's (a checkpoint, or the final LoRA
it collects into the run folder).

An engine's file is taken as it is (sd-scripts' kohya file is copied with lora-run's metadata added) or converted
tensor by tensor (diffusion-pipe's), and neither reads what the tensors hold: a LoRA cut off while it was written, an
empty file, one trained into NaN, one of another rank than the recipe's, or one whose modules are another family's
(an engine of another version, a file left by another tool) would be collected and reported as the run's LoRA.
:func:`lora_problem` says why such a file is not one lora-run may report, read from its header and raw bytes (no
torch): :func:`lora_run_formats.lora_file_problem` (complete, LoRA tensors, floating point, finite), then every
module against the engine's layout of the recipe's family (:func:`module_pattern`, built from the family packages'
own conversion tables), then every module's rank against ``[lora] rank`` (both engines give every module that rank:
`network_dim`, diffusion-pipe's adapter `rank`; lora-run refuses what would change it).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_run.errors import BackendError



def module_pattern(family: str, layout: str) -> re.Pattern[str]:
    """The LoRA module names an engine writes for ``family`` in ``layout``: ``"kohya"`` (sd-scripts' BFL-style names,
    ``lora_unet_double_blocks_0_img_attn_qkv``; HunyuanImage-2.1 in both spellings its converter reads, and text-encoder
    modules, which ``unexpected_modules`` of the kohya backend judges by the recipe), ``"diffusers"`` (FLUX.1's
    ``transformer.transformer_blocks.0.attn.to_q``) or ``"comfyui"`` (HunyuanImage-2.1's
    ``diffusion_model.double_blocks.0.img_attn.qkv``)."""
    def any_of(names: Any) -> str:
        return "(?:" + "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True)) + ")"

    if family == "flux.1-dev":
        from lora_run_flux.lora import DOUBLE, SINGLE

        if layout == "kohya":
            return re.compile(rf"lora_unet_(?:double_blocks_\d+_{any_of(DOUBLE)}|single_blocks_\d+_{any_of(SINGLE)})"
                              r"|lora_te\d_\w+")
        if layout == "diffusers":
            double = [part for parts in DOUBLE.values() for part in parts]
            single = [part for parts in SINGLE.values() for part in parts]
            return re.compile(rf"(?:transformer\.)?(?:transformer_blocks\.\d+\.{any_of(double)}|"
                              rf"single_transformer_blocks\.\d+\.{any_of(single)})")
    if family == "hunyuan-image-2.1":
        from lora_run_hunyuan_image.lora import ALIASES, DOUBLE_NAMES, SINGLE_NAMES

        if layout == "kohya":
            double = [*DOUBLE_NAMES, *(a for a, name in ALIASES.items() if name in DOUBLE_NAMES)]
            single = [*SINGLE_NAMES, *(a for a, name in ALIASES.items() if name in SINGLE_NAMES)]
            return re.compile(rf"lora_unet_(?:double_blocks_\d+_{any_of(double)}|single_blocks_\d+_{any_of(single)})"
                              r"|lora_te\d_\w+")
        if layout == "comfyui":
            return re.compile(rf"diffusion_model\.(?:double_blocks\.\d+\.{any_of(DOUBLE_NAMES.values())}|"
                              rf"single_blocks\.\d+\.{any_of(SINGLE_NAMES.values())})")
    raise ValueError(f"no {layout} LoRA layout is known for {family}")


def lora_problem(path: Path, *, family: str, layout: str, rank: int) -> str | None:
    """Why the LoRA an engine wrote at ``path`` is not one lora-run may report as the run's, or None: not a complete
    LoRA of finite floating-point tensors, a module that is not the engine's ``layout`` of ``family``
    (:func:`module_pattern`), or a module of another rank than ``rank`` (the recipe's ``[lora] rank``)."""
    from lora_run_formats import lora_file_problem, read_header, tensor_names
    from lora_run_formats.lora_check import LORA_KEY

    problem = lora_file_problem(path)
    if problem is not None:
        return problem
    header = read_header(path, kind="lora")
    modules = module_pattern(family, layout)
    for name in tensor_names(header):
        match = LORA_KEY.match(name)
        if match is None or not modules.fullmatch(match["module"]):
            return (f"tensor {name} is not a module of a {family} LoRA in the {layout} layout this engine writes "
                    "(another family's or another tool's file?)")
        shape = header[name]["shape"]
        if match["which"] == "alpha":
            continue
        held = shape[0] if match["which"].startswith(("lora_down", "lora_A")) else shape[-1]
        if len(shape) != 2 or held != rank:
            return f"tensor {name} has the shape {shape}: rank {held}, not the recipe's [lora] rank = {rank}"
    return None


def collectable(path: Path, *, engine: str, family: str, layout: str, rank: int, log: Path) -> None:
    """Refuse the LoRA ``path`` an engine wrote as the run's (BackendError: exit 1, the run folder kept, the manifest
    ``failed``) when :func:`lora_problem` finds one."""
    problem = lora_problem(path, family=family, layout=layout, rank=rank)
    if problem is not None:
        raise BackendError(f"{engine} wrote {path}, which is not a LoRA lora-run can report as the run's: {problem}; "
                           f"nothing was collected (log: {log})")
