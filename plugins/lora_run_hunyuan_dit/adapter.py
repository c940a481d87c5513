"""Hunyuan-DiT adapter (v1.2, and v1.1 with ``[model] version = "1.1"``): diffusers ``HunyuanDiT2DModel`` +
``HunyuanDiTPipeline`` components.

Objective: DDPM, ``x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε``, with the prediction type and the noise schedule *of the model*:
the source's ``scheduler/scheduler_config.json`` when it has one, otherwise the documented schedule of the
release (``SCHEDULES``: v-prediction, v1.2 β 0.00085 → 0.018, v1.1 β 0.00085 → 0.03, scaled-linear, 1000 steps).
The target is what that config's ``prediction_type`` names (the sampler reads the same config): ``v_prediction``
(every Tencent release) ``v = √ᾱ_t·ε - √(1-ᾱ_t)·x0``, or ``epsilon`` (diffusers' ``DDPMScheduler`` default, also
for a config without the key) ``ε``; Min-SNR-γ takes the matching form. ``[model] version`` names the release where the model cannot (and must agree with it where it
can); unset, the transformer's config decides (style/size conditioning = v1.1). One ``DDPMScheduler`` built from
that config gives both the training ᾱ_t and the sampling scheduler. The model has
``learn_sigma`` (8 output channels: 4 for v, 4 for the variance); the first half is trained, the variance
half is left alone (no VLB term). Latents: the SDXL-style 8× ``AutoencoderKL`` with 4 channels, ``z·0.13025``.
The timestep embedding sees the exact integer t in every precision, in training and in sampling, as in Tencent's
trainer (``embed_exact_timesteps``, ``exact_sampling_timesteps``; under bf16 diffusers would round t > 256).

Text: the bilingual BERT/CLIP tower (77 tokens) and mT5-XL (256 tokens), each with its attention mask (the
transformer replaces masked positions by its learned padding embedding); both cached. Rotary position
embeddings are computed per bucket size the way the pipeline does (``get_2d_rotary_pos_embed`` over the crop
region from ``get_resize_crop_region_for_grid`` with the 512-px base grid).

diffusers gives this model neither ``add_adapter`` nor gradient checkpointing: the LoRA is injected with
``peft.inject_adapter_in_model`` and checkpointing wraps each ``model.blocks[i]`` forward (keyword
arguments, including the long-skip input ``skip``, pass through). The LoRA file is our diffusers-style
safetensors (``transformer.<module>.lora_A/B.weight``, scale folded in); ``load_lora_into_pipeline`` injects
the same peft config into ``pipe.transformer`` and loads it with ``set_peft_model_state_dict``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_run_native.adapters.base import (COMMON_FEATURES, SourceLoader, first_line, pipeline_prompt, real_tokenizer,
                                           require_lora_fit, seed_generators, text_rows)
from lora_run_formats import config_fit as cf
from lora_run_native.shapes import FamilyShape, preset_inputs

_ATTN = [r"blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)", r"blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)"]
_MLP = [r"blocks\.\d+\.ff\.net\.(0\.proj|2)"]
_OTHER = [r"blocks\.\d+\.norm1\.linear", r"blocks\.\d+\.skip_linear"]

NUM_TRAIN_TIMESTEPS = 1000
BERT_LENGTH, T5_LENGTH = 77, 256

#: The DDPM schedule each Hunyuan-DiT release was trained with, used when the model folder carries no
#: ``scheduler/scheduler_config.json``. v1.2: β_end 0.018 (Tencent's HunyuanDiT-v1.2-Diffusers scheduler config
#: and v1.2 training scripts; ComfyUI's model config for v1.2). v1.1 (and v1.0): β_end 0.03 (Tencent's
#: HunyuanDiT-v1.1-Diffusers scheduler config and ``hydit/config.py`` defaults; ComfyUI's v1.0/1.1 config).
SCHEDULES: dict[str, dict[str, Any]] = {
    version: {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": 0.00085, "beta_end": beta_end,
              "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "clip_sample": False,
              "steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading",
              "variance_type": "fixed_small"}
    for version, beta_end in (("1.2", 0.018), ("1.1", 0.03))
}
SCHEDULER_FILE = "scheduler/scheduler_config.json"
#: The scheduler ``prediction_type`` values trained (what the model predicts; ``DDPMScheduler``'s default is
#: ``epsilon``), with their names in words.
PREDICTION_TYPES = {"v_prediction": "v-prediction", "epsilon": "ε-prediction"}

#: For the memory model (perfmodel.py): 40 blocks; self-attention q/k/v/out and cross-attention q/out on the
#: 1408-wide stream, cross-attention k/v from the 1024-wide text; MLP 1408 → 6144 → 1408.
_ATTENTION_SHAPES = [(40 * 4, 1408, 1408), (40 * 1, 1408, 1408), (40 * 2, 1024, 1408)]
_MLP_SHAPES = [(40, 1408, 6144), (40, 6144, 1408)]
MEMORY_SHAPE = FamilyShape(1.50e9, 40, 1408, 16, 0, 59_000.0, 83_000.0, {
    "attention": _ATTENTION_SHAPES, "attention+mlp": _ATTENTION_SHAPES + _MLP_SHAPES,
    "all-linear": _ATTENTION_SHAPES + _MLP_SHAPES},
    # an image token feeds the five 1408-wide attention layers and the MLP (the text's k/v are not per image token)
    lora_inputs_per_token=preset_inputs(40 * 5 * 1408, 40 * (1408 + 6144)))

DDPM_FEATURES = frozenset({
    "noise_offset", "min_snr_gamma",
    "timestep_sampling:uniform", "timestep_sampling:sigmoid", "timestep_sampling:logit-normal",
})


#: Why the native backend refuses a feature for Hunyuan-DiT (shown with the refusal).
REASONS = {
    "guidance": "train.guidance feeds a distilled guidance embedding; Hunyuan-DiT v1.2 has no "
                "guidance-embedding input — leave it at 1.0",
    "timestep_sampling:flux-shift": "flux-shift is FLUX.1-dev's resolution-dependent shift; Hunyuan-DiT v1.2 is "
                                    "a DDPM model without any shift",
    "text_encoder_training": "the native backend trains a text-encoder LoRA only on FLUX.1-dev's CLIP-L; "
                             "Hunyuan-DiT's text encoders stay frozen (their outputs are cached)",
    "timestep_weighting": "train.timestep_weighting is SD3's flow-matching loss weighting (σ-based); "
                          "Hunyuan-DiT v1.2 is a DDPM model — use train.min_snr_gamma instead",
    "timestep_sampling:shift": "a timestep shift is defined for flow matching; Hunyuan-DiT v1.2 is a DDPM "
                               "model (use uniform, sigmoid or logit-normal)",
}


class HunyuanDiTAdapter(SourceLoader):
    """Hunyuan-DiT v1.2: DDPM (v- or ε-prediction, as the model's scheduler config says), BERT + mT5 conditioning
    with masks, learn_sigma output."""

    family = "hunyuan-dit-1.2"
    features, reasons = COMMON_FEATURES | DDPM_FEATURES | {"fp8", "fp8_matmul"}, REASONS
    objective = "ddpm"
    pixel_multiple = 16
    memory_shape = MEMORY_SHAPE
    COMPONENTS = {"transformer": ("diffusers", "HunyuanDiT2DModel", "torch_dtype", {}),
                  "vae": ("diffusers", "AutoencoderKL", "torch_dtype", {}),
                  "bert": ("transformers", "BertModel", "dtype", {"add_pooling_layer": False}),
                  "mt5": ("transformers", "T5EncoderModel", "dtype", {})}
    target_presets = {
        "attention": _ATTN,
        "attention+mlp": _ATTN + _MLP,
        "all-linear": _ATTN + _MLP + _OTHER,
    }
    lora_formats = ("diffusers",)
    text_encoders = ("bert", "mt5")
    text_masks = frozenset({"prompt_attention_mask", "prompt_attention_mask_2"})
    cache_tag = "hunyuan-dit"
    vae_file_key = None
    trainable_text_encoder = None
    default_hub_id = "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"
    file_keys = ()
    pipeline_names = ("HunyuanDiTPipeline",)
    #: what each component's config.json declares and where its weights hold it: the transformer's blocks, its
    #: patch embedding (hidden size × input channels), its attention width (the output norm's input) and the mT5
    #: projection's input
    config_fits = {"transformer": (cf.Blocks("num_layers", r"^blocks\.(\d+)\.", "block"),
                                   cf.Width(("hidden_size",), r"pos_embed\.proj\.weight", 0),
                                   cf.Width(("in_channels",), r"pos_embed\.proj\.weight", 1),
                                   cf.Width(("num_attention_heads", "attention_head_dim"), r"norm_out\.linear\.weight", 1),
                                   cf.Width(("cross_attention_dim_t5",), r"text_embedder\.linear_1\.weight", 1)),
                   "vae": cf.AUTOENCODER_KL, "text_encoder": cf.BERT, "text_encoder_2": cf.T5_ENCODER}
    WHAT = {"transformer": "the Hunyuan-DiT transformer", "vae": "the autoencoder", "bert": "the BERT/CLIP text encoder",
            "mt5": "the mT5 text encoder", "bert_tokenizer": "the BERT tokenizer", "mt5_tokenizer": "the mT5 tokenizer"}

    def __init__(self, recipe: Any, **kw: Any):
        super().__init__(recipe, **kw)
        self.tokenizers: dict[str, Any] = {}
        self._rope: dict[tuple, Any] = {}
        self._alphas_cumprod: Any = None
        self._schedule: tuple[dict[str, Any], str] | None = None

    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        problems = super().check_sources()  # [model.files] is refused by core: the family declares no slots
        if getattr(self.options, "text_max_length", None):
            problems.append((("backend", self.recipe.backend.name, "text_max_length"), "Hunyuan-DiT's text "
                             f"lengths are fixed by the model ({BERT_LENGTH} BERT + {T5_LENGTH} mT5 tokens); remove it"))
        from lora_run_native.adapters.base import is_local_source

        if not problems and is_local_source(self._source() or ""):      # hub sources: checked when loaded
            try:
                self.schedule()
                chosen = self.recipe.model.version
                config, where = self._component_json("transformer/config.json")
                if chosen and config is not None and \
                        bool(config.get("use_style_cond_and_image_meta_size")) != (chosen == "1.1"):
                    problems.append((("model", "version"), f"is \"{chosen}\", but {where} is a "
                                     + ("≤ v1.1 model (style and image-size conditioning)"
                                        if chosen == "1.2" else "v1.2 model (no style or image-size conditioning)")
                                     + "; set the release the weights are, or remove the key"))
            except Exception as exc:  # noqa: BLE001 - ModelSourceError: "<file>: [key] message"
                key = ("model", "version") if "[model.version]" in str(exc) else ("model", "source")
                problems.append((key, str(exc).split("] ", 1)[-1]))
        return problems

    # ------------------------------------------------------------------------------ noise schedule
    def _component_json(self, relative: str) -> tuple[dict[str, Any] | None, str]:
        """A JSON file of the source (local folder, or the hub cache / hub): (contents or None, where)."""
        from lora_run_formats.model_files import config_json, read_json
        from lora_run_native.adapters.base import is_local_source

        src = self._source()
        if src is None:
            return None, ""
        if is_local_source(src):
            path = Path(src) / relative
            if not os.path.lexists(path):
                return None, str(path)
            data, problem = read_json(path)
            if problem is not None:
                raise self.error("model.source", f"{path}: {problem}")
            return data, str(path)
        try:
            from huggingface_hub import hf_hub_download

            kw = self.source_kwargs()
            sub, name = relative.rsplit("/", 1)
            found = hf_hub_download(src, name, subfolder=sub, revision=kw.get("revision"),
                                    local_files_only=kw.get("local_files_only", False))
            return config_json(found), f"{src}/{relative}"
        except Exception:  # noqa: BLE001 - not in the cache / no such file: the documented default applies
            return None, f"{src}/{relative}"

    def version(self) -> str:
        """The release: ``[model] version``, else the transformer config's (style/size conditioning = v1.1),
        else v1.2."""
        if self.recipe.model.version:
            return self.recipe.model.version
        config, _ = self._component_json("transformer/config.json")
        return "1.1" if config and config.get("use_style_cond_and_image_meta_size") else "1.2"

    def schedule(self) -> tuple[dict[str, Any], str]:
        """(DDPM scheduler config, where it came from): the source's ``scheduler/scheduler_config.json``, or the
        release's documented schedule. Checked: a prediction type trained here (``PREDICTION_TYPES``); agreement
        with ``[model] version``."""
        if self._schedule is not None:
            return self._schedule
        version = self.version()
        config, where = self._component_json(SCHEDULER_FILE)
        if config is None:
            self._schedule = (dict(SCHEDULES[version]), f"the documented Hunyuan-DiT v{version} schedule "
                              f"(no {SCHEDULER_FILE} in the source)")
            return self._schedule
        if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            raise self.error("model.source", f"{where}: prediction_type is {config.get('prediction_type')!r}; "
                             "the native backend trains Hunyuan-DiT with v-prediction (\"v_prediction\", every "
                             "Tencent release) or ε-prediction (\"epsilon\")")
        if config.get("trained_betas") is None:
            for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
                if key not in config:
                    raise self.error("model.source", f"{where}: has no {key!r}; not a DDPM scheduler config")
        chosen = self.recipe.model.version
        if chosen and config.get("trained_betas") is None:
            expected = SCHEDULES[chosen]
            if any(config[k] != expected[k] for k in ("beta_start", "beta_end", "beta_schedule",
                                                      "num_train_timesteps")):
                raise self.error("model.version", f"is \"{chosen}\" (β {expected['beta_start']} → "
                                 f"{expected['beta_end']}), but {where} has β {config['beta_start']} → "
                                 f"{config['beta_end']} ({config['beta_schedule']}); the model's own schedule wins: "
                                 "remove [model] version, or point [model] source at a v" + chosen + " model")
        self._schedule = ({k: v for k, v in config.items() if not k.startswith("_")}, where)
        return self._schedule

    def schedule_note(self) -> str:
        """The schedule in words for `lora-run plan` (a hub source is read only when loaded)."""
        from lora_run_native.adapters.base import is_local_source

        if not is_local_source(self._source() or ""):
            return "prediction type and noise schedule: the model's scheduler config, read when it is loaded"
        try:
            config, where = self.schedule()
        except Exception as exc:  # noqa: BLE001 - `check` reports it with the key
            return f"noise schedule: {str(exc).split('] ', 1)[-1]}"
        prediction = PREDICTION_TYPES[config.get("prediction_type", "epsilon")]
        if config.get("trained_betas") is not None:
            return f"{prediction}, noise schedule: trained betas from {where}"
        return (f"{prediction}, noise schedule {config['beta_schedule']} β {config['beta_start']} → "
                f"{config['beta_end']}, {config['num_train_timesteps']} steps, from {where}")

    def noise_scheduler(self) -> Any:
        """A ``DDPMScheduler`` on the model's schedule (training ᾱ_t and sampling use this same config)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.schedule()[0])

    # ------------------------------------------------------------------------------------- loading
    def _load_tokenizers(self) -> None:
        from transformers import AutoTokenizer

        for key, sub in (("bert", "bert_tokenizer"), ("mt5", "mt5_tokenizer")):
            if key in self.tokenizers:
                continue
            tok = self.from_source(AutoTokenizer, sub)
            if not real_tokenizer(tok):
                raise self.error("model.source", f"{self._source()}/{self.TOKENIZER_SUBFOLDER[sub]}: no tokenizer files "
                                 "there" + (self.cache_hint() or " (or not in the local cache while offline)"))
            self.tokenizers[key] = tok

    def load_transformer(self) -> Any:
        from .attention import use_dispatching_attention

        model = self._component("transformer", self.compute_dtype)
        model.requires_grad_(False)
        embed_exact_timesteps(model)
        use_dispatching_attention(model)        # so the native backend's attention kernel reaches it
        conditioned = bool(model.config.use_style_cond_and_image_meta_size)
        if self.recipe.model.version and conditioned != (self.recipe.model.version == "1.1"):
            raise self.error("model.version", f"is \"{self.recipe.model.version}\", but {self._source()} is a "
                             + ("≤ v1.1 model (style and image-size conditioning)" if conditioned
                                else "v1.2 model (no style or image-size conditioning)")
                             + "; set the release the weights are, or remove the key")
        return model

    def text_settings(self) -> str:
        return f"len:{BERT_LENGTH},{T5_LENGTH}"

    def enable_gradient_checkpointing(self, transformer: Any) -> None:
        """Checkpoint every ``transformer.blocks[i]`` (diffusers has no checkpointing for this model): the block's
        forward is replaced on the instance, so module names (and the LoRA keys) stay the same."""
        import torch
        import torch.utils.checkpoint

        for block in transformer.blocks:
            if getattr(block, "_lora_run_checkpointed", False):
                continue
            inner = block.forward

            def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)

            block.forward = forward
            block._lora_run_checkpointed = True

    # ------------------------------------------------------------------------------------ encoding
    def text_keys(self, encoder: str) -> tuple[str, ...]:
        return {"bert": ("prompt_embeds", "prompt_attention_mask"),
                "mt5": ("prompt_embeds_2", "prompt_attention_mask_2")}[encoder]

    def text_shapes(self, encoder: str) -> dict[str, tuple[int | None, ...]]:
        """The fixed lengths (BERT 77, mT5 256 tokens; masks of the same length) of each encoder's width (BERT's
        ``hidden_size``, mT5's ``d_model``)."""
        if encoder == "bert":
            return {"prompt_embeds": (BERT_LENGTH, self.encoder_width("bert", "hidden_size")),
                    "prompt_attention_mask": (BERT_LENGTH,)}
        return {"prompt_embeds_2": (T5_LENGTH, self.encoder_width("mt5", "d_model")),
                "prompt_attention_mask_2": (T5_LENGTH,)}

    def encode_captions(self, captions: list[str], encoders: tuple[str, ...] | None = None) -> dict[str, Any]:
        """As ``HunyuanDiTPipeline.encode_prompt``: padded to the fixed length, hidden states of the last layer,
        the attention mask kept."""
        import torch

        encoders = encoders or self.text_encoders
        out: dict[str, Any] = {}
        for key, length, suffix in (("bert", BERT_LENGTH, ""), ("mt5", T5_LENGTH, "_2")):
            if key not in encoders:
                continue
            tok, model = self.tokenizers[key], self.encoders[key]
            inputs = tok(list(captions), padding="max_length", max_length=length, truncation=True,
                         return_attention_mask=True, return_tensors="pt")
            mask = inputs.attention_mask.to(self.device)
            with torch.no_grad():
                embeds = model(inputs.input_ids.to(self.device), attention_mask=mask)[0]
            out["prompt_embeds" + suffix] = embeds
            out["prompt_attention_mask" + suffix] = mask.long()
        return out

    def text_encoder_targets(self, module: Any) -> list[str]:
        return []

    # ----------------------------------------------------------------------------------- objective
    def alphas_cumprod(self) -> Any:
        """ᾱ_t of the model's schedule (``noise_scheduler()``; float32)."""
        import torch

        if self._alphas_cumprod is None:
            self._alphas_cumprod = self.noise_scheduler().alphas_cumprod.to(torch.float32).clone()
        return self._alphas_cumprod

    @property
    def prediction_type(self) -> str:
        """``"v_prediction"`` or ``"epsilon"``: the model's scheduler config's (``DDPMScheduler`` reads a config
        without the key as ``epsilon``)."""
        return str(self.schedule()[0].get("prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule()[0].get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))

    def sample_timesteps(self, batch: int, generator: Any, latents: Any) -> Any:
        """Integer t in [0, T-1] (as float32; T = 1000): ``uniform`` draws it uniformly; ``logit-normal`` is the
        references' draw on this scheduler's own table — u = sigmoid(N(m, s)) indexes the DDPM scheduler's
        descending training timesteps (T−1, …, 0), t = T − 1 − ⌊T·u⌋, as the flow families' σ is the flow table's
        entry at that index (so t ≈ (T−1)·σ of the same draw, every step reachable, each index its own step);
        ``sigmoid`` draws u ∈ (0, 1) exactly as σ for flow models and takes t = round((T-1)·u)."""
        import torch

        from lora_run_native import timesteps

        t = self.recipe.train
        steps_total = self.num_train_timesteps
        if t.timestep_sampling == "uniform":
            steps = torch.randint(0, steps_total, (batch,), generator=generator)
        elif t.timestep_sampling == "logit-normal":
            index = timesteps.logit_normal_index(batch, generator, t.logit_mean, t.logit_std, steps=steps_total)
            steps = steps_total - 1 - index
        else:
            u = timesteps.sample_sigmas(t.timestep_sampling, batch, generator, sigmoid_scale=t.sigmoid_scale,
                                        logit_mean=t.logit_mean, logit_std=t.logit_std)
            steps = torch.round(u * (steps_total - 1))
        return steps.to(device=latents.device, dtype=torch.float32)

    def _coefficients(self, t: Any, ndim: int) -> tuple[Any, Any]:
        ac = self.alphas_cumprod().to(t.device)[t.long()]
        shape = (-1, *([1] * (ndim - 1)))
        return ac.sqrt().view(shape), (1.0 - ac).sqrt().view(shape)

    def noisy_and_target(self, x0: Any, noise: Any, t: Any) -> tuple[Any, Any]:
        """``DDPMScheduler.add_noise``, and the target of the model's prediction type: ``get_velocity`` for
        v-prediction, the noise for ε-prediction."""
        a, s = self._coefficients(t, x0.dim())
        a, s = a.to(x0.dtype), s.to(x0.dtype)
        noisy = a * x0 + s * noise
        if self.prediction_type == "epsilon":
            return noisy, noise
        return noisy, a * noise - s * x0

    def loss_weights(self, t: Any) -> Any:
        """Min-SNR-γ (``train.min_snr_gamma`` = γ), SNR = ᾱ_t / (1 - ᾱ_t): w = min(SNR, γ) / (SNR + 1) for
        v-prediction, min(SNR, γ) / SNR for ε-prediction (the Min-SNR paper's forms, as diffusers' examples and
        sd-scripts apply them); ones without it."""
        import torch

        gamma = self.recipe.train.min_snr_gamma
        if gamma is None:
            return torch.ones(t.shape[0], dtype=torch.float32, device=t.device)
        ac = self.alphas_cumprod().to(t.device)[t.long()]
        snr = ac / (1.0 - ac)
        return (torch.clamp(snr, max=float(gamma)) / (snr if self.prediction_type == "epsilon" else snr + 1.0)).float()

    def rotary_embedding(self, transformer: Any, height: int, width: int, device: Any) -> Any:
        """(cos, sin) for a latent of ``height × width`` (cached per size), as the pipeline computes them."""
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

        patch = transformer.config.patch_size
        grid = (height // patch, width // patch)
        key = (grid, str(device))
        if key not in self._rope:
            base = 512 // 8 // patch
            crops = get_resize_crop_region_for_grid(grid, base)
            head_dim = transformer.inner_dim // transformer.num_heads
            self._rope[key] = get_2d_rotary_pos_embed(head_dim, crops, grid, device=device, output_type="pt")
        return self._rope[key]

    def predict(self, transformer: Any, noisy: Any, t: Any, text: dict[str, Any], guidance: float) -> Any:
        import torch

        from lora_run_native.timesteps import to_device

        dtype = self.compute_dtype
        b, c, h, w = noisy.shape
        rope = self.rotary_embedding(transformer, h, w, noisy.device)
        meta = style = None
        if transformer.config.use_style_cond_and_image_meta_size:
            # v1.1: original size = target size = the bucket in pixels (images are resized into it), crop at
            # (0, 0), style 0 — what the pipeline passes at sampling (generate() gives original_size the same way)
            px = [h * 8, w * 8]
            meta = to_device(torch.tensor([px + px + [0, 0]] * b, dtype=dtype), noisy.device)
            style = torch.zeros(b, device=noisy.device, dtype=torch.long)
        # t in float32 (exact for every step), everything else in the compute dtype: the timestep embedding sees
        # the exact integer t (bf16 would make 999 → 1000) and computes in the compute dtype (embed_exact_timesteps)
        out = transformer(noisy.to(dtype), t.to(torch.float32), encoder_hidden_states=text["prompt_embeds"].to(dtype),
                          text_embedding_mask=text["prompt_attention_mask"],
                          encoder_hidden_states_t5=text["prompt_embeds_2"].to(dtype),
                          text_embedding_mask_t5=text["prompt_attention_mask_2"], image_meta_size=meta, style=style,
                          image_rotary_emb=rope, return_dict=False)[0]
        return out[:, :c]                       # learn_sigma: the first half is the prediction (v or ε)

    # ------------------------------------------------------------------------------------- outputs
    def lora_files(self, fmt: str, transformer_sd: dict[str, Any], te_sd: dict[str, Any], *, rank: int,
                   alpha: float, te_rank: int | None, metadata: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        scale = alpha / rank
        out = {f"transformer.{k}": (v * scale if (".lora_B." in k and scale != 1.0) else v)
               for k, v in transformer_sd.items()}
        return out, {"format": "pt", "lora_rank": str(rank), **metadata}

    # ----------------------------------------------------------------------------------- inference
    def _scheduler(self) -> Any:
        return self.noise_scheduler()        # the very schedule training uses

    def load_pipeline(self, device: Any, dtype: Any) -> Any:
        from diffusers import HunyuanDiTPipeline

        pipe = self.assemble_pipeline(HunyuanDiTPipeline, device, dtype, safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False)
        embed_exact_timesteps(pipe.transformer)
        return pipe

    def load_lora_into_pipeline(self, pipe: Any, path: Path, adapter_name: str = "identity") -> None:
        load_hunyuan_dit_lora(pipe.transformer, path, adapter_name)

    def sampling_pipeline(self, transformer: Any) -> Any:
        from diffusers import HunyuanDiTPipeline

        pipe = HunyuanDiTPipeline(vae=self.sample_vae, text_encoder=None, tokenizer=None, transformer=transformer,
                                  scheduler=self._scheduler(), safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)
        pipe.set_progress_bar_config(disable=True)
        embed_exact_timesteps(transformer)
        return pipe

    def generate_batch(self, pipe: Any, *, prompt: str | Sequence[str] | None, seeds: Sequence[int], steps: int,
                       guidance: float, width: int, height: int, lora_scale: float,
                       text: dict[str, Any] | None = None) -> list:
        """One image per seed from one pipeline call: batched starting latents, one per seed, and one generator
        per seed for the DDPM steps' noise (row ``i`` from seed ``i``, as alone). With ``text`` (pre-encoded,
        samples during training; one row per seed, a batch of 1 repeated) there is no negative prompt encoding,
        so classifier-free guidance is off; with ``prompt`` the pipeline's CFG uses ``guidance``: one prompt goes
        once with ``num_images_per_prompt`` = the seeds, per-seed prompts as a list, one image each (the pipeline
        then encodes one empty negative prompt per image; with more than one image per listed prompt, diffusers
        0.42.1 would tile the attention masks while it repeats the embeddings row by row). BERT and mT5 pad to
        their fixed lengths (77, 256) with masks, so a row does not depend on the others. The LoRA strength
        scales the peft layers (``scale_lora_layers``) for this call."""
        from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

        if text is not None:
            kwargs = self.pipe_text(pipe, text_rows(text, len(seeds)), ("prompt_embeds", "prompt_embeds_2"),
                                    ("prompt_attention_mask", "prompt_attention_mask_2"))
            kwargs["guidance_scale"] = 1.0
            per_prompt = 1
        else:
            shared, per_prompt = pipeline_prompt(prompt, seeds)
            kwargs = {"prompt": shared, "guidance_scale": guidance}
        noise = self.initial_noise(pipe, seeds, height, width)
        scale_lora_layers(pipe.transformer, float(lora_scale))
        try:
            with exact_sampling_timesteps(pipe):
                result = pipe(num_inference_steps=steps, height=height, width=width, latents=noise,
                              num_images_per_prompt=per_prompt, generator=seed_generators(seeds), output_type="pil",
                              use_resolution_binning=False, original_size=(height, width), **kwargs)
        finally:
            unscale_lora_layers(pipe.transformer, float(lora_scale))
        return list(result.images)


def _hidden_dtype_of_the_text(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook of ``time_extra_emb``: its hidden dtype is the dtype of the text states it pools (the
    compute dtype), not the timestep's."""
    states = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
    return args, {**kwargs, "hidden_dtype": states.dtype}


def embed_exact_timesteps(transformer: Any) -> None:
    """Let a ``HunyuanDiT2DModel`` take its timestep in float32 while computing in its own dtype.

    diffusers 0.42.1's forward calls ``time_extra_emb(timestep, …, hidden_dtype=timestep.dtype)``, and the
    hidden dtype is all the timestep's dtype decides there: the sinusoid of t is computed in float32 from
    whatever t is given and then cast to ``hidden_dtype`` for the timestep MLP (and the v1.1 size embedding
    likewise). A bf16 t is already rounded (999 → 1000, steps of 2 above 256 and 4 above 512); a float32 t with
    ``hidden_dtype`` float32 would run the embedder in float32 against bf16 weights. This hook passes the dtype
    of the text states instead — the compute dtype, what a compute-dtype t gave before — so a float32 t reaches
    the sinusoid exactly and nothing else in the model changes dtype (Tencent's and ComfyUI's ``TimestepEmbedder``
    likewise embed the exact t in float32, then cast to the model's dtype). Idempotent."""
    embedding = transformer.time_extra_emb
    if not getattr(embedding, "_lora_run_exact_t", False):
        embedding.register_forward_pre_hook(_hidden_dtype_of_the_text, with_kwargs=True)
        embedding._lora_run_exact_t = True


@contextlib.contextmanager
def exact_sampling_timesteps(pipe: Any) -> Any:
    """During one ``HunyuanDiTPipeline`` call, give the transformer the scheduler's exact step in float32.

    The pipeline casts each step t to the latents' dtype before the transformer call (bf16: 981 → 980); training
    embeds the exact t (``predict``), so samples do too. The pipeline calls the transformer once per entry of
    ``scheduler.timesteps``, in order; each call's t is checked to be that step cast as the pipeline casts it,
    so a pipeline that calls differently fails loudly instead of sampling on the wrong steps."""
    import torch

    calls = [0]

    def exact(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        given = args[1] if len(args) > 1 else kwargs["timestep"]
        steps = pipe.scheduler.timesteps
        if calls[0] >= len(steps):
            raise RuntimeError("HunyuanDiTPipeline called the transformer more than once per step "
                               f"({len(steps)} steps)")
        step = steps[calls[0]].to(device=given.device, dtype=torch.float32)
        calls[0] += 1
        t = step.expand(given.shape[0]).clone()
        if not torch.equal(t.to(given.dtype), given):
            raise RuntimeError(f"HunyuanDiTPipeline passed t = {given.tolist()} at step {calls[0]} of "
                               f"{len(steps)}, expected {step.item():g} (cast to {given.dtype})")
        if len(args) > 1:
            return (args[0], t, *args[2:]), kwargs
        return args, {**kwargs, "timestep": t}

    embed_exact_timesteps(pipe.transformer)
    handle = pipe.transformer.register_forward_pre_hook(exact, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def lora_config_of(tensors: dict[str, Any], rank: int | None = None) -> Any:
    """The peft ``LoraConfig`` that fits a saved Hunyuan-DiT LoRA (targets and rank from the tensors; the
    scale is folded into ``lora_B``, so alpha = rank)."""
    from peft import LoraConfig

    targets = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
    r = rank or int(next(v.shape[0] for k, v in tensors.items() if ".lora_A." in k))
    return LoraConfig(r=r, lora_alpha=r, target_modules=targets)


def load_hunyuan_dit_lora(transformer: Any, path: Path, adapter_name: str = "identity") -> None:
    """Inject the file's peft config into ``transformer`` and load the weights (``set_peft_model_state_dict``);
    every tensor must land (no unexpected keys)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from lora_run.errors import OutputError
    from lora_run_formats import load_lora

    try:
        tensors, _ = load_lora(path)
    except Exception as exc:  # noqa: BLE001
        raise OutputError(f"{path}: not a readable safetensors LoRA ({first_line(exc)})") from None
    if not tensors or not all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in tensors):
        raise OutputError(f"{path}: not a Hunyuan-DiT LoRA of ours (keys transformer.<module>.lora_A/B.weight)")
    require_lora_fit({"transformer": transformer}, tensors, path, "Hunyuan-DiT")
    try:
        inject_adapter_in_model(lora_config_of(tensors), transformer, adapter_name=adapter_name)
        state = {k[len("transformer."):]: v for k, v in tensors.items()}
        result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    except Exception as exc:  # noqa: BLE001
        raise OutputError(f"{path}: cannot load this LoRA into Hunyuan-DiT v1.2 ({first_line(exc)})") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise OutputError(f"{path}: {len(unexpected)} tensor(s) match no layer of this Hunyuan-DiT model "
                          f"({unexpected[:2]} …)")
