"""Hunyuan-DiT v1.2 adapter: diffusers ``HunyuanDiT2DModel`` + ``HunyuanDiTPipeline`` components.

Objective: DDPM with v-prediction on the scaled-linear schedule of Hunyuan-DiT (β from 0.00085 to 0.03 over
1000 steps): ``x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε``, target ``v = √ᾱ_t·ε - √(1-ᾱ_t)·x0``. The model has
``learn_sigma`` (8 output channels: 4 for v, 4 for the variance); the first half is trained, the variance
half is left alone (no VLB term). Latents: the SDXL-style 8× ``AutoencoderKL`` with 4 channels, ``z·0.13025``.

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

from pathlib import Path
from typing import Any

from .base import COMMON_FEATURES
from .hunyuan_common import SHARED_REASONS, SourceLoader, first_line, real_tokenizer

_ATTN = [r"blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)", r"blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)"]
_MLP = [r"blocks\.\d+\.ff\.net\.(0\.proj|2)"]
_OTHER = [r"blocks\.\d+\.norm1\.linear", r"blocks\.\d+\.skip_linear"]

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.03
BERT_LENGTH, T5_LENGTH = 77, 256

DDPM_FEATURES = frozenset({
    "noise_offset", "min_snr_gamma",
    "timestep_sampling:uniform", "timestep_sampling:sigmoid", "timestep_sampling:logit-normal",
})


class HunyuanDiTAdapter(SourceLoader):
    """Hunyuan-DiT v1.2: DDPM v-prediction, BERT + mT5 conditioning with masks, learn_sigma output."""

    family = "hunyuan-dit-1.2"
    pixel_multiple = 16
    objective = "ddpm-v"
    features = COMMON_FEATURES | DDPM_FEATURES | {"fp8"}
    reasons = {
        **SHARED_REASONS,
        "timestep_weighting": "train.timestep_weighting is SD3's flow-matching loss weighting (σ-based); "
                              "Hunyuan-DiT v1.2 is a DDPM model — use train.min_snr_gamma instead",
        "timestep_sampling:shift": "a timestep shift is defined for flow matching; Hunyuan-DiT v1.2 is a DDPM "
                                   "model (use uniform, sigmoid or logit-normal)",
    }
    target_presets = {
        "attention": _ATTN,
        "attention+mlp": _ATTN + _MLP,
        "all-linear": _ATTN + _MLP + _OTHER,
    }
    lora_formats = ("diffusers",)
    text_encoders = ("bert", "mt5")
    trainable_text_encoder = None
    default_hub_id = "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers"
    file_keys = ()
    SUBFOLDER = {"transformer": "transformer", "vae": "vae", "bert": "text_encoder", "mt5": "text_encoder_2"}
    TOKENIZER_SUBFOLDER = {"bert_tokenizer": "tokenizer", "mt5_tokenizer": "tokenizer_2"}
    WHAT = {"transformer": "the Hunyuan-DiT transformer", "vae": "the autoencoder", "bert": "the BERT/CLIP text encoder",
            "mt5": "the mT5 text encoder", "bert_tokenizer": "the BERT tokenizer", "mt5_tokenizer": "the mT5 tokenizer"}

    def __init__(self, recipe: Any, **kw: Any):
        super().__init__(recipe, **kw)
        self.tokenizers: dict[str, Any] = {}
        self._rope: dict[tuple, Any] = {}
        self._alphas_cumprod: Any = None

    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        problems = [(key, "single files are not read for Hunyuan-DiT v1.2; give [model.source] (a hub id or a "
                     "diffusers folder)") if key[:2] == ("model", "files") else (key, message)
                    for key, message in super().check_sources()]
        if getattr(self.options, "text_max_length", None):
            problems.append((("backend", self.recipe.backend.name, "text_max_length"), "Hunyuan-DiT v1.2's text "
                             f"lengths are fixed by the model ({BERT_LENGTH} BERT + {T5_LENGTH} mT5 tokens); remove it"))
        return problems

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

    def _component(self, key: str, dtype: Any) -> Any:
        from diffusers import AutoencoderKL, HunyuanDiT2DModel
        from transformers import BertModel, T5EncoderModel

        if key == "transformer":
            return self.from_source(HunyuanDiT2DModel, key, torch_dtype=dtype)
        if key == "vae":
            return self.from_source(AutoencoderKL, key, torch_dtype=dtype)
        if key == "bert":
            return self.from_source(BertModel, key, dtype=dtype, add_pooling_layer=False)
        return self.from_source(T5EncoderModel, key, dtype=dtype)

    def load_encoders(self, only: tuple[str, ...] | None = None) -> None:
        self._load_tokenizers()
        for key in ("vae", "bert", "mt5"):
            if key in self.encoders or (only is not None and key not in only):
                continue
            self.encoders[key] = self.frozen(self._component(key, self.compute_dtype).to(self.device))

    def load_transformer(self) -> Any:
        model = self._component("transformer", self.compute_dtype)
        model.requires_grad_(False)
        if model.config.use_style_cond_and_image_meta_size:
            raise self.error("model.source", "is a Hunyuan-DiT ≤ v1.1 model (style and image-size conditioning); "
                             "the native adapter trains v1.2")
        return model

    def encoder_identity(self, part: str) -> str:
        dtype = self.recipe.train.mixed_precision
        if part == "latents":
            return f"hunyuan-dit|vae|{self.source_identity('vae')}|{dtype}"
        return (f"hunyuan-dit|bert:{self.source_identity('text_encoder')}|mt5:{self.source_identity('text_encoder_2')}|"
                f"tok:{self.source_identity('tokenizer')}|{self.source_identity('tokenizer_2')}|"
                f"len:{BERT_LENGTH},{T5_LENGTH}|{dtype}")

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
        """ᾱ_t of the scaled-linear schedule, as ``DDPMScheduler`` computes it (float32)."""
        import torch

        if self._alphas_cumprod is None:
            betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
            self._alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return self._alphas_cumprod

    def sample_timesteps(self, batch: int, generator: Any, latents: Any) -> Any:
        """Integer t in [0, 999] (as float32): ``uniform`` draws it uniformly; ``sigmoid`` / ``logit-normal``
        draw u ∈ (0, 1) exactly as for flow models and take t = round(999·u)."""
        import torch

        from .. import timesteps

        t = self.recipe.train
        if t.timestep_sampling == "uniform":
            steps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        else:
            u = timesteps.sample_sigmas(t.timestep_sampling, batch, generator, sigmoid_scale=t.sigmoid_scale,
                                        logit_mean=t.logit_mean, logit_std=t.logit_std)
            steps = torch.round(u * (NUM_TRAIN_TIMESTEPS - 1))
        return steps.to(device=latents.device, dtype=torch.float32)

    def _coefficients(self, t: Any, ndim: int) -> tuple[Any, Any]:
        ac = self.alphas_cumprod().to(t.device)[t.long()]
        shape = (-1, *([1] * (ndim - 1)))
        return ac.sqrt().view(shape), (1.0 - ac).sqrt().view(shape)

    def noisy_and_target(self, x0: Any, noise: Any, t: Any) -> tuple[Any, Any]:
        a, s = self._coefficients(t, x0.dim())
        a, s = a.to(x0.dtype), s.to(x0.dtype)
        return a * x0 + s * noise, a * noise - s * x0

    def loss_weights(self, t: Any) -> Any:
        """Min-SNR-γ for v-prediction (``train.min_snr_gamma`` = γ): w = min(SNR, γ) / (SNR + 1) with
        SNR = ᾱ_t / (1 - ᾱ_t); ones without it."""
        import torch

        gamma = self.recipe.train.min_snr_gamma
        if gamma is None:
            return torch.ones(t.shape[0], dtype=torch.float32, device=t.device)
        ac = self.alphas_cumprod().to(t.device)[t.long()]
        snr = ac / (1.0 - ac)
        return (torch.clamp(snr, max=float(gamma)) / (snr + 1.0)).float()

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
        dtype = self.compute_dtype
        b, c, h, w = noisy.shape
        rope = self.rotary_embedding(transformer, h, w, noisy.device)
        out = transformer(noisy.to(dtype), t.to(dtype), encoder_hidden_states=text["prompt_embeds"].to(dtype),
                          text_embedding_mask=text["prompt_attention_mask"],
                          encoder_hidden_states_t5=text["prompt_embeds_2"].to(dtype),
                          text_embedding_mask_t5=text["prompt_attention_mask_2"], image_meta_size=None, style=None,
                          image_rotary_emb=rope, return_dict=False)[0]
        return out[:, :c]                       # learn_sigma: the first half is the v prediction

    # ------------------------------------------------------------------------------------- outputs
    def lora_files(self, fmt: str, transformer_sd: dict[str, Any], te_sd: dict[str, Any], *, rank: int,
                   alpha: float, te_rank: int | None, metadata: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        scale = alpha / rank
        out = {f"transformer.{k}": (v * scale if (".lora_B." in k and scale != 1.0) else v)
               for k, v in transformer_sd.items()}
        return out, {"format": "pt", "lora_rank": str(rank), **metadata}

    # ----------------------------------------------------------------------------------- inference
    def _scheduler(self) -> Any:
        from diffusers import DDPMScheduler

        try:
            return self.from_source(DDPMScheduler, "scheduler", subfolder="scheduler")
        except Exception:  # noqa: BLE001 - v1.2's scheduler is known
            return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                                 beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                                 steps_offset=1)

    def load_pipeline(self, device: Any, dtype: Any) -> Any:
        from diffusers import HunyuanDiTPipeline

        self._load_tokenizers()
        parts = {key: self._component(key, dtype) for key in ("transformer", "vae", "bert", "mt5")}
        pipe = HunyuanDiTPipeline(vae=parts["vae"], text_encoder=parts["bert"], tokenizer=self.tokenizers["bert"],
                                  transformer=parts["transformer"], scheduler=self._scheduler(), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False,
                                  text_encoder_2=parts["mt5"], tokenizer_2=self.tokenizers["mt5"])
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        pipe._lora_run_dtype = dtype
        return pipe

    def load_lora_into_pipeline(self, pipe: Any, path: Path, adapter_name: str = "identity") -> None:
        load_hunyuan_dit_lora(pipe.transformer, path, adapter_name)

    def sampling_pipeline(self, transformer: Any) -> Any:
        from diffusers import HunyuanDiTPipeline

        pipe = HunyuanDiTPipeline(vae=self.sample_vae, text_encoder=None, tokenizer=None, transformer=transformer,
                                  scheduler=self._scheduler(), safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, pipe: Any, *, prompt: str | None, seed: int, steps: int, guidance: float, width: int,
                 height: int, lora_scale: float, text: dict[str, Any] | None = None) -> Any:
        """One image. With ``text`` (pre-encoded, samples during training) there is no negative prompt
        encoding, so classifier-free guidance is off; with ``prompt`` the pipeline's CFG uses ``guidance``.
        The LoRA strength scales the peft layers (``scale_lora_layers``) for this call."""
        import torch
        from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

        dtype = getattr(pipe, "_lora_run_dtype", None) or self.compute_dtype
        device = pipe._execution_device
        kwargs: dict[str, Any] = {}
        if text is not None:
            kwargs.update(prompt_embeds=text["prompt_embeds"].to(device, dtype),
                          prompt_attention_mask=text["prompt_attention_mask"].to(device),
                          prompt_embeds_2=text["prompt_embeds_2"].to(device, dtype),
                          prompt_attention_mask_2=text["prompt_attention_mask_2"].to(device), guidance_scale=1.0)
        else:
            kwargs.update(prompt=prompt, guidance_scale=guidance)
        channels = pipe.transformer.config.in_channels
        noise = torch.randn((1, channels, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(seed))
        generator = torch.Generator("cpu").manual_seed(seed)
        scale_lora_layers(pipe.transformer, float(lora_scale))
        try:
            result = pipe(num_inference_steps=steps, height=height, width=width, latents=noise.to(device, dtype),
                          generator=generator, output_type="pil", use_resolution_binning=False, **kwargs)
        finally:
            unscale_lora_layers(pipe.transformer, float(lora_scale))
        return result.images[0]


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
