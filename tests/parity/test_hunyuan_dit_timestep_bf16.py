"""Hunyuan-DiT under bf16: the timestep embedding sees the exact integer step, as Tencent's trainer embeds it.

The reference, from Tencent's HunyuanDiT (``hydit/modules/embedders.py``, ``TimestepEmbedder``; DiT's form, which
ComfyUI's Hunyuan-DiT model uses too): the sinusoid of the integer t is computed in float32,
freqs_k = exp(−ln(10000)·k/128) for k = 0…127, emb = [cos(t·freqs), sin(t·freqs)], then cast to the model's dtype
and fed to the timestep MLP. Tencent trains in fp16, which holds every t ≤ 2048 exactly.

diffusers' ``HunyuanDiT2DModel`` takes its hidden dtype from the timestep's dtype, so lora-run used to pass t in
the compute dtype: in bf16, t > 256 is rounded before the sinusoid (999 → 1000, 513 → 512, 301 → 300) while x_t and
the v target use the exact t. Checked here on CPU in bf16 with a tiny model:

- training (``predict`` on the transformer ``load_transformer`` gives): the timestep MLP's input and output equal
  the reference for t = 999, 998, 513, 301, 257, 17, 0; the planted mistake (t cast to bf16 first, the old path)
  is caught;
- nothing else changes: where t is exact in bf16 (t ≤ 256) the prediction is bitwise the old one, and every module
  computes in the dtype it computed in before (no upcast to float32), with and without CPU autocast, v1.2 and v1.1;
- sampling (``generate_batch`` on the bf16 pipeline): the embedding gets the scheduler's exact steps
  (751, 501, 251, 1 for 4 steps), where ``HunyuanDiTPipeline`` alone gives 752, 500, 251, 1.

The CUDA path is the same code: the embedding and sampling checks also run on CUDA where a GPU is present
(``DEVICES``); so far they have run on CPU only.
"""
from __future__ import annotations

import math

import pytest

from .conftest import minimal_recipe


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                               pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")])]
STEPS = [999.0, 998.0, 513.0, 301.0, 257.0, 17.0, 0.0]
#: the sinusoidal embeddings (diffusers computes them in float32 whatever the inputs)
SINUSOIDS = ("time_extra_emb.time_proj", "time_extra_emb.size_proj")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from lora_run_hunyuan_dit.tiny import build_tiny_hunyuan_dit

    root = tmp_path_factory.mktemp("dit-bf16")
    return {"1.2": build_tiny_hunyuan_dit(root / "v12"), "1.1": build_tiny_hunyuan_dit(root / "v11", version="1.1")}


def adapter_for(folder, version: str = "1.2"):
    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    return HunyuanDiTAdapter(minimal_recipe("hunyuan-dit-1.2", folder, train={"mixed_precision": "bf16"},
                                            model={"version": version, "offline": True}))


def text_inputs(b: int, device="cpu"):
    import torch

    g = torch.Generator().manual_seed(5)
    mask = torch.zeros(b, 77, dtype=torch.long)
    mask[:, :6] = 1
    mask5 = torch.zeros(b, 256, dtype=torch.long)
    mask5[:, :9] = 1
    text = {"prompt_embeds": torch.randn(b, 77, 32, generator=g), "prompt_attention_mask": mask,
            "prompt_embeds_2": torch.randn(b, 256, 32, generator=g), "prompt_attention_mask_2": mask5}
    return {k: v.to(device) for k, v in text.items()}


def reference_sinusoid(t, dtype):
    """Tencent's ``timestep_embedding(t, 256)`` of the exact integer t, in float32, cast to the model's dtype."""
    import torch

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)   # on t's device


def embedding_seen(predict, model, t):
    """What the model's timestep MLP gets and gives during ``predict(model, x, t, text, 1.0)``."""
    import torch

    seen = {}

    def hook(module, args, out):
        seen["input"], seen["output"] = args[0].detach().clone(), out.detach().clone()
    handle = model.time_extra_emb.timestep_embedder.register_forward_hook(hook)
    try:
        with torch.no_grad():
            predict(model, torch.randn(len(t), 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(t.device), t,
                    text_inputs(len(t), t.device), 1.0)
    finally:
        handle.remove()
    return seen


def embeds_the_exact_step(predict, model, t) -> bool:
    import torch

    seen = embedding_seen(predict, model, t)
    ref_in = reference_sinusoid(t, torch.bfloat16)
    with torch.no_grad():
        ref_out = model.time_extra_emb.timestep_embedder(ref_in)
    return bool(torch.equal(seen["input"], ref_in) and torch.equal(seen["output"], ref_out))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_time_embedding_is_the_exact_integer_steps(folders, device):
    import torch

    adapter = adapter_for(folders["1.2"])
    model = adapter.load_transformer().to(device)
    assert adapter.compute_dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    t = torch.tensor(STEPS, device=device)
    assert embeds_the_exact_step(adapter.predict, model, t)
    assert embedding_seen(adapter.predict, model, t)["output"].dtype == torch.bfloat16
    # planted: the old path, t cast to the compute dtype before the model (999 → 1000, 513 → 512, 301 → 300)
    rounded = lambda tr, x, steps, text, g: adapter.predict(tr, x, steps.to(torch.bfloat16), text, g)  # noqa: E731
    assert t.to(torch.bfloat16).float().tolist() == [1000.0, 1000.0, 512.0, 300.0, 256.0, 17.0, 0.0]
    assert not embeds_the_exact_step(rounded, model, t)
    for step in (999.0, 513.0, 301.0):                    # each rounded step alone is caught, not just the batch
        assert not embeds_the_exact_step(rounded, model, torch.tensor([step], device=device))
    # the check itself sees the difference: the reference sinusoids of 999 and 1000 differ by far more than bf16's
    # rounding
    assert (reference_sinusoid(torch.tensor([999.0]), torch.float32)
            - reference_sinusoid(torch.tensor([1000.0]), torch.float32)).abs().max() > 0.5


def old_model(model):
    """``model`` as it was fed before the fix: the timestep in the compute dtype at the model's input, no
    hidden-dtype hook (a deep copy, so ``model`` keeps its own)."""
    import copy

    import torch

    old = copy.deepcopy(model)
    old.time_extra_emb._forward_pre_hooks.clear()

    def in_compute_dtype(module, args, kwargs):
        return (args[0], args[1].to(torch.bfloat16), *args[2:]), kwargs
    old.register_forward_pre_hook(in_compute_dtype, with_kwargs=True)
    return old


def run_recording_dtypes(adapter, model, t, autocast: bool):
    """The prediction and every submodule's output dtype (by name) for one ``predict`` call."""
    import contextlib

    import torch

    dtypes: dict[str, object] = {}
    handles = [module.register_forward_hook(
        lambda mod, args, out, name=name: dtypes.__setitem__(name, out.dtype if torch.is_tensor(out) else
                                                               tuple(o.dtype for o in out if torch.is_tensor(o))))
        for name, module in model.named_modules() if name]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with torch.no_grad(), context:
            x = torch.randn(len(t), 4, 8, 12, generator=torch.Generator().manual_seed(2))
            pred = adapter.predict(model, x, t, text_inputs(len(t)), 1.0)
    finally:
        for h in handles:
            h.remove()
    return pred, dtypes


@pytest.mark.parametrize("version", ["1.2", "1.1"])
@pytest.mark.parametrize("autocast", [False, True])
def test_nothing_else_changes_dtype(folders, version, autocast):
    """Where t is exact in bf16 the fixed call is bitwise the old one, every module computes in the same dtype
    as before (nothing is upcast to float32: the memory is the same), and at t = 999 the fix changes the output."""
    import torch

    adapter = adapter_for(folders[version], version)
    model = adapter.load_transformer()
    before = old_model(model)
    exact = torch.tensor([0.0, 17.0, 200.0, 256.0])
    new, new_dtypes = run_recording_dtypes(adapter, model, exact, autocast)
    old, old_dtypes = run_recording_dtypes(adapter, before, exact, autocast)
    assert torch.equal(new, old)
    assert new_dtypes == old_dtypes and new_dtypes["time_extra_emb"] == torch.bfloat16
    assert new.dtype == torch.bfloat16
    # float32 only where diffusers computes in float32 by design, before and after: the sinusoid, and the SiLU of
    # the conditioning inside the adaptive norms
    in_fp32 = {name for name, dtype in new_dtypes.items() if dtype == torch.float32}
    assert "time_extra_emb.time_proj" in in_fp32
    assert all(n in SINUSOIDS or n.endswith(("norm1.silu", "norm_out.silu")) for n in in_fp32), sorted(in_fp32)
    rounded = torch.tensor([999.0, 513.0])
    assert not torch.equal(run_recording_dtypes(adapter, model, rounded, autocast)[0],
                           run_recording_dtypes(adapter, before, rounded, autocast)[0])


# ---------------------------------------------------------------------------------------------- sampling
def steps_embedded(pipe, call):
    """The timesteps that reach the model's sinusoid (``time_proj``) during ``call()``, one list per step."""
    seen = []
    handle = pipe.transformer.time_extra_emb.time_proj.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].dtype, args[0].tolist())))
    try:
        call()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("device", DEVICES)
def test_samples_embed_the_schedulers_exact_steps(folders, device):
    import torch

    from lora_run_hunyuan_dit.adapter import exact_sampling_timesteps

    adapter = adapter_for(folders["1.2"])
    pipe = adapter.load_pipeline(torch.device(device), torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    kw = dict(prompt="ohwx, a portrait", seeds=[3], steps=4, guidance=4.0, width=64, height=64, lora_scale=1.0)
    with torch.no_grad():
        seen = steps_embedded(pipe, lambda: adapter.generate_batch(pipe, **kw))
    assert pipe.scheduler.timesteps.tolist() == [751, 501, 251, 1]
    # classifier-free guidance: the negative and the positive row each get the step
    assert seen == [(torch.float32, [s, s]) for s in (751.0, 501.0, 251.0, 1.0)]
    # planted: the pipeline alone casts t to the latents' dtype (bf16: 751 → 752, 501 → 500)
    with torch.no_grad():
        alone = steps_embedded(pipe, lambda: pipe(prompt="ohwx, a portrait", num_inference_steps=4, height=64,
                                                  width=64, guidance_scale=4.0, output_type="latent",
                                                  use_resolution_binning=False))
    assert alone == [(torch.bfloat16, [s, s]) for s in (752.0, 500.0, 251.0, 1.0)] and alone != seen
    # the hook checks that the pipeline calls once per step with that step: a call out of order fails loudly
    pipe.scheduler.set_timesteps(4)
    text = text_inputs(1, device)
    args = (torch.randn(1, 4, 8, 8, dtype=torch.bfloat16, device=device),
            torch.tensor([999.0], dtype=torch.bfloat16, device=device))
    kwargs = dict(encoder_hidden_states=text["prompt_embeds"].bfloat16(),
                  text_embedding_mask=text["prompt_attention_mask"],
                  encoder_hidden_states_t5=text["prompt_embeds_2"].bfloat16(),
                  text_embedding_mask_t5=text["prompt_attention_mask_2"],
                  image_rotary_emb=adapter.rotary_embedding(pipe.transformer, 8, 8, device))
    with pytest.raises(RuntimeError, match="expected 751"), exact_sampling_timesteps(pipe), torch.no_grad():
        pipe.transformer(*args, **kwargs)
