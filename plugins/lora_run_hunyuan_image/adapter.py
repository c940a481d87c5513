"""HunyuanImage-2.1 adapter: diffusers ``HunyuanImageTransformer2DModel`` + ``HunyuanImagePipeline`` components.

Flow matching like FLUX (``x_t = (1-σ)·x0 + σ·ε``, target ``ε - x0``), but the transformer takes *unpacked*
latents ``(B, 64, H/32, W/32)`` from the 32× ``AutoencoderKLHunyuanImage`` (normalised as ``z · 0.75289``,
no shift) and its timestep on the 0–1000 scale (σ·1000 in float32, exact under bf16 too; the model does not
scale it). Text: Qwen2.5-VL-7B
hidden states (the pipeline's prompt template, the hidden state two layers before the last, the template's
tokens dropped) with their mask, plus the ByT5 glyph encoder on the quoted text of the caption (zeros and an
empty mask when the caption quotes nothing), as ``HunyuanImagePipeline.encode_prompt`` computes them (its
functions are reused) except which quotes count: ``glyph_text`` follows Tencent's pipeline and sd-scripts
("…", ‘…’, “…”; an ASCII apostrophe is not a quotation mark), in training and in sampling alike. Both are cached like FLUX's encodings.

Sources: ``[model] source`` (hub id or local diffusers folder) and/or ``[model.files]`` single files as ComfyUI,
sd-scripts and diffusion-pipe use them (``transformer`` = ``hunyuanimage2.1.safetensors`` in Tencent's layout,
``vae``, ``qwen`` = ``qwen_2.5_vl_7b``, ``byt5`` = ``byt5_small_glyphxl``; converted by ``hunyuan_files``). A
component given as a file takes its config from ``source`` when that has one, else it is inferred from the
tensors (Qwen: the known Qwen2.5-VL-7B text config). Tokenizers come from ``source``, or without one from the
hub model ``hunyuanvideo-community/HunyuanImage-2.1-Diffusers`` (cached copies only while offline). The base
model is trained; the guidance-distilled (meanflow) variant is refused.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_run_formats import config_fit as cf
from lora_run_formats import layouts
from lora_run_hunyuan_image.lora import lora_targets as hunyuan_image_lora_targets
from lora_run_native.adapters.base import COMMON_FEATURES, MMDIT_TARGET_PRESETS, ModelAdapter, mmdit_fit
from lora_run_native.adapters.base import (SourceLoader, first_line, pipeline_prompt, real_tokenizer,
                                           require_lora_fit, text_rows)
from lora_run_native.shapes import FamilyShape, mmdit_lora_inputs, mmdit_lora_shapes


#: HunyuanImagePipeline's prompt encoding constants (pipeline_hunyuanimage.py): Qwen template, the number of
#: template tokens dropped, the hidden state used (the third from the end) and the text lengths.
QWEN_MAX_LENGTH = 1000
TEMPLATE_DROP = 34
HIDDEN_STATE_SKIP_LAYER = 2
BYT5_MAX_LENGTH = 128

FLOW_NO_FLUX_SHIFT = frozenset({
    "noise_offset", "timestep_weighting",
    "timestep_sampling:uniform", "timestep_sampling:sigmoid", "timestep_sampling:logit-normal",
    "timestep_sampling:shift",
})


class HunyuanImageAdapter(SourceLoader):
    """HunyuanImage-2.1: rectified flow on unpacked 32× latents, Qwen2.5-VL + ByT5 glyph conditioning."""

    family = "hunyuan-image-2.1"
    pixel_multiple = 32
    objective = "flow"
    features = COMMON_FEATURES | FLOW_NO_FLUX_SHIFT | {"fp8", "fp8_matmul"}
    reasons = {
        "guidance": "train.guidance feeds a distilled guidance embedding; HunyuanImage-2.1 (base) has no "
                    "guidance-embedding input — leave it at 1.0",
        "timestep_sampling:flux-shift": "flux-shift is FLUX.1-dev's resolution-dependent shift; HunyuanImage-2.1 "
                                        "samples with a fixed shift (use timestep_sampling = \"shift\" with "
                                        "train.shift)",
        "text_encoder_training": "the native backend trains a text-encoder LoRA only on FLUX.1-dev's CLIP-L; "
                                 "HunyuanImage-2.1's text encoders stay frozen (their outputs are cached)",
        "min_snr_gamma": "Min-SNR-γ is defined for DDPM noise schedules; flow matching has no alphas_cumprod "
                         "(use train.timestep_weighting or the pseudo-huber loss)",
    }
    target_presets = MMDIT_TARGET_PRESETS
    #: ``kohya`` (the recipe's name for the ComfyUI file) is written in ComfyUI's ``diffusion_model.`` layout
    lora_formats = ("diffusers", "comfyui", "kohya")   # <name>.safetensors, comfyui/<name>…, kohya/<name>…
    lora_targets = staticmethod(hunyuan_image_lora_targets)
    text_encoders = ("qwen", "byt5")
    text_masks = frozenset({"prompt_embeds_mask", "prompt_embeds_mask_2"})
    cache_tag = "hunyuan-image"
    trainable_text_encoder = None
    default_hub_id = "hunyuanvideo-community/HunyuanImage-2.1-Diffusers"
    file_keys = ("transformer", "vae", "qwen", "byt5")
    WHAT = {"transformer": "the HunyuanImage-2.1 transformer", "vae": "the 32× autoencoder",
            "qwen": "the Qwen2.5-VL text encoder", "byt5": "the ByT5 glyph encoder",
            "qwen_tokenizer": "the Qwen tokenizer", "byt5_tokenizer": "the ByT5 tokenizer"}
    vae_scale_factor = 32
    #: what each component's config.json declares and where its weights hold it (the transformer's token refiner
    #: and ByT5 projection besides the MMDiT fields), in a diffusers folder and in the single files (Tencent's
    #: transformer and autoencoder layouts; the text encoders' files are in transformers' layout)
    config_fits = {"transformer": mmdit_fit("transformer_blocks", "single_transformer_blocks", r"x_embedder\.proj\.weight",
                                            r"context_embedder\.proj_in\.weight", "text_embed_dim")
                   + (cf.Blocks("num_refiner_layers", r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.",
                                "refiner block"),
                      cf.Width(("text_embed_2_dim",), r"context_embedder_2\.linear_1\.weight", 1)),
                   "text_encoder": cf.QWEN2_5_VL, "text_encoder_2": cf.T5_ENCODER}
    file_fits = {"transformer": mmdit_fit("double_blocks", "single_blocks", r"img_in\.proj\.weight",
                                          r"txt_in\.input_embedder\.weight", "text_embed_dim")
                 + (cf.Blocks("num_refiner_layers", r"(?:^|\.)txt_in\.individual_token_refiner\.blocks\.(\d+)\.",
                              "refiner block"),
                    cf.Width(("text_embed_2_dim",), r"(?:.*\.)?byt5_in\.fc1\.weight", 1)),
                 "vae": cf.AUTOENCODER_FILE, "qwen": cf.QWEN2_5_VL, "byt5": cf.T5_ENCODER}
    #: the single-file layouts ``files`` converts (Tencent's and diffusers' transformer and autoencoder)
    file_layouts = {"transformer": (layouts.HUNYUAN_IMAGE_TRANSFORMER, layouts.HUNYUAN_IMAGE_DIFFUSERS_TRANSFORMER),
                    "vae": (layouts.HUNYUAN_IMAGE_VAE,), "qwen": (layouts.QWEN2_5_VL,), "byt5": (layouts.T5_ENCODER,)}
    #: what the other files' widths are to the transformer (Tencent's or diffusers' names): Qwen's hidden states
    #: enter the token refiner, ByT5's the glyph projection, the latents (patch 1) the image embedding; FLUX.1's
    #: T5-XXL given as the glyph encoder is named
    file_links = (layouts.Link("qwen", layouts.LM_HIDDEN,
                               r"(?:^|\.)(?:txt_in\.input_embedder|context_embedder\.proj_in)\.weight$", "is {} wide",
                               known=layouts.QWEN_WIDTHS),
                  layouts.Link("byt5", layouts.T5_HIDDEN,
                               r"(?:^|\.)(?:byt5_in\.fc1|context_embedder_2\.linear_1)\.weight$", "is {} wide",
                               known=layouts.T5_WIDTHS),
                  layouts.Link("vae", layouts.LATENT, r"(?:^|\.)(?:img_in|x_embedder)\.proj\.weight$",
                               "has {} latent channels", known=layouts.LATENT_CHANNELS))
    pipeline_names = ("HunyuanImagePipeline",)
    COMPONENTS = {"transformer": ("diffusers", "HunyuanImageTransformer2DModel", "torch_dtype", {}),
                  "vae": ("diffusers", "AutoencoderKLHunyuanImage", "torch_dtype", {}),
                  "qwen": ("transformers", "Qwen2_5_VLForConditionalGeneration", "dtype", {}),
                  "byt5": ("transformers", "T5EncoderModel", "dtype", {})}
    #: for the memory model (perfmodel.py): 1000 Qwen + 128 ByT5 text tokens travel with the image tokens
    memory_shape = FamilyShape(17.43e9, 60, 3584, 32, 1000 + 128, 94_000.0, 117_000.0,
                               mmdit_lora_shapes(20, 40, 3584, 4 * 3584),
                               lora_inputs_per_token=mmdit_lora_inputs(20, 40, 3584, 4 * 3584))

    def __init__(self, recipe: Any, **kw: Any):
        super().__init__(recipe, **kw)
        self.tokenizers: dict[str, Any] = {}
        self.guidance_embeds = False

    @property
    def qwen_max_length(self) -> int:
        value = getattr(self.options, "text_max_length", None)
        return min(QWEN_MAX_LENGTH, value) if value else QWEN_MAX_LENGTH

    # ------------------------------------------------------------------------------------- sources
    def _source(self) -> str | None:
        """``[model] source``; without one (all components as files) the default hub id gives tokenizers."""
        return self.recipe.model.source or self.default_hub_id

    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        m = self.recipe.model
        if m.source is not None:
            return super().check_sources()
        problems = ModelAdapter.check_sources(self)
        for key in self.file_keys:
            if m.files.get(key) is None:
                problems.append((("model", "files", key), "is required when [model.source] is not set (or set "
                                 "[model.source] to a HunyuanImage-2.1 diffusers folder / hub id that provides it)"))
        return problems

    def _load_file(self, key: str, dtype: Any) -> Any:
        from diffusers import AutoencoderKLHunyuanImage, HunyuanImageTransformer2DModel
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

        from . import files as hf
        from lora_run_native.single_files import infer_t5_config

        path = Path(self.recipe.model.files.get(key))
        if not os.path.isfile(path):
            raise self.error(f"model.files.{key}", f"file not found: {path}")
        try:
            raw = load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise self.error(f"model.files.{key}", f"{path.name} is not a readable safetensors file ({exc})") from None
        config = self.source_json(self.SUBFOLDER[key])
        optional: tuple[str, ...] = ()
        try:
            if key == "transformer":
                state = hf._strip_prefix(raw)
                if not any(k.startswith("transformer_blocks.") for k in state):
                    state = hf.transformer_original_to_diffusers(state)
                config = config or hf.infer_transformer_config(state)
                build = lambda: HunyuanImageTransformer2DModel.from_config(config)  # noqa: E731
            elif key == "vae":
                state = hf.vae_original_to_diffusers(raw)
                config = config or hf.infer_vae_config(state)
                build = lambda: AutoencoderKLHunyuanImage.from_config(config)  # noqa: E731
            elif key == "qwen":
                state = hf.qwen_comfy_to_transformers5(raw)
                embed = state.get("model.language_model.embed_tokens.weight")
                if embed is None:
                    raise hf.LayoutError("no model.embed_tokens.weight (not a Qwen2.5-VL language model)")
                if config is None:
                    if embed.shape[1] != hf.QWEN_7B_TEXT["hidden_size"]:
                        raise self.error("model.source", f"gives no text_encoder/config.json for {path.name} (hidden "
                                         f"size {embed.shape[1]}, not Qwen2.5-VL-7B's); point [model.source] at a "
                                         "HunyuanImage-2.1 diffusers folder or hub id")
                    qcfg = Qwen2_5_VLConfig(text_config=dict(hf.QWEN_7B_TEXT), vocab_size=hf.QWEN_7B_TEXT["vocab_size"])
                else:
                    qcfg = Qwen2_5_VLConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
                build = lambda: Qwen2_5_VLForConditionalGeneration(qcfg)  # noqa: E731
                optional = ("model.visual.", "lm_head.")        # only the language model's hidden states are used
            else:
                state = {k: v for k, v in raw.items() if not k.startswith("decoder.")}
                config = {k: v for k, v in (config or infer_t5_config(state)).items() if not k.startswith("_")}
                build = lambda: T5EncoderModel(T5Config(**config))  # noqa: E731
                optional = ("encoder.embed_tokens.",)           # tied to shared.weight
        except (hf.LayoutError, KeyError) as exc:
            raise self.error(f"model.files.{key}", f"{path.name} does not look like {self.WHAT[key]}: {exc}") from None
        return self._instantiate(build, state, key, path.name, dtype, optional)

    def _instantiate(self, build: Any, state: dict[str, Any], key: str, name: str, dtype: Any,
                     optional: tuple[str, ...]) -> Any:
        import torch
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = build()
        own = model.state_dict()
        missing = [k for k in own if k not in state and not k.startswith(optional)]
        shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        unexpected = [k for k in state if k not in own and not k.startswith(optional)]
        if missing or shape or unexpected:
            detail = (f"missing {missing[:3]}" if missing else f"shape mismatch at {shape[:3]}" if shape
                      else f"unexpected {unexpected[:3]}")
            raise self.error(f"model.files.{key}", f"{name} does not match {self.WHAT[key]}'s config ({detail})")
        full = {k: (state[k] if k in state else torch.zeros(own[k].shape, dtype=own[k].dtype)) for k in own}
        full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
        model.load_state_dict(full, strict=False, assign=True)
        if hasattr(model, "tie_weights"):
            try:
                model.tie_weights()
            except Exception:  # noqa: BLE001 - T5's shared embedding
                pass
        return model.to(torch.device("cpu"))

    # ------------------------------------------------------------------------------------- loading
    def _load_tokenizers(self) -> None:
        from transformers import AutoTokenizer, ByT5Tokenizer

        if "qwen" not in self.tokenizers:
            tok = self.from_source(AutoTokenizer, "qwen_tokenizer")
            if not real_tokenizer(tok):
                raise self.error("model.source", f"{self._source()}/tokenizer: no Qwen tokenizer files there"
                                 + (self.cache_hint() or " (or not in the local cache while offline)"))
            self.tokenizers["qwen"] = tok
        if "byt5" not in self.tokenizers:
            self.tokenizers["byt5"] = self.from_source(ByT5Tokenizer, "byt5_tokenizer")

    def vae_factor(self, vae: Any) -> int:
        return int(vae.config.spatial_compression_ratio)

    def load_transformer(self) -> Any:
        model = self._component("transformer", self.compute_dtype)
        model.requires_grad_(False)
        if getattr(model.config, "use_meanflow", False):
            raise self.error("model.source", "is the guidance-distilled (meanflow) HunyuanImage-2.1; the native "
                             "backend trains the base model (hunyuanvideo-community/HunyuanImage-2.1-Diffusers)")
        self.guidance_embeds = bool(model.config.guidance_embeds)
        return model

    def text_settings(self) -> str:
        return f"len:{self.qwen_max_length}|drop:{TEMPLATE_DROP}|skip:{HIDDEN_STATE_SKIP_LAYER}|glyph:{GLYPH_RULE}"

    def enable_gradient_checkpointing(self, transformer: Any) -> None:
        """diffusers 0.42.1's default checkpoint function takes no keyword arguments, which this model passes
        (``attention_mask`` …): use one that forwards them."""
        import torch.utils.checkpoint

        def checkpoint(module: Any, *args: Any, **kwargs: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, **kwargs)

        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)

    # ------------------------------------------------------------------------------------ encoding
    def text_keys(self, encoder: str) -> tuple[str, ...]:
        return {"qwen": ("prompt_embeds", "prompt_embeds_mask"),
                "byt5": ("prompt_embeds_2", "prompt_embeds_mask_2")}[encoder]

    def text_shapes(self, encoder: str) -> dict[str, tuple[int | None, ...]]:
        """Qwen: ``qwen_max_length`` tokens (padded to it with the template, whose tokens are dropped) of the
        language model's ``hidden_size``; ByT5: 128 tokens of its ``d_model`` (zeros without quoted text); masks of
        the same lengths."""
        if encoder == "qwen":
            width = self.encoder_width("qwen", "text_config.hidden_size|hidden_size")
            return {"prompt_embeds": (self.qwen_max_length, width), "prompt_embeds_mask": (self.qwen_max_length,)}
        return {"prompt_embeds_2": (BYT5_MAX_LENGTH, self.encoder_width("byt5", "d_model")),
                "prompt_embeds_mask_2": (BYT5_MAX_LENGTH,)}

    def encode_captions(self, captions: list[str], encoders: tuple[str, ...] | None = None) -> dict[str, Any]:
        import torch
        from diffusers import HunyuanImagePipeline

        encoders = encoders or self.text_encoders
        out: dict[str, Any] = {}
        pipe = HunyuanImagePipeline     # its encoding functions only use `self` for a default device
        with torch.no_grad():
            if "qwen" in encoders:
                model = self.encoders["qwen"]
                embeds, mask = pipe._get_qwen_prompt_embeds(
                    None, tokenizer=self.tokenizers["qwen"], text_encoder=model, prompt=list(captions),
                    device=self.device, dtype=model.dtype, tokenizer_max_length=self.qwen_max_length,
                    template=_template(), drop_idx=TEMPLATE_DROP, hidden_state_skip_layer=HIDDEN_STATE_SKIP_LAYER)
                out["prompt_embeds"], out["prompt_embeds_mask"] = embeds, mask.long()
            if "byt5" in encoders:
                out["prompt_embeds_2"], out["prompt_embeds_mask_2"] = glyph_embeds(
                    self.tokenizers["byt5"], self.encoders["byt5"], captions, self.device)
        return out

    def text_encoder_targets(self, module: Any) -> list[str]:
        return []

    # ----------------------------------------------------------------------------------- objective
    def image_seq_len(self, latents: Any) -> int:
        return int(latents.shape[-1] * latents.shape[-2])     # patch size 1

    def predict(self, transformer: Any, noisy: Any, t: Any, text: dict[str, Any], guidance: float) -> Any:
        import torch

        dtype = self.compute_dtype
        b = noisy.shape[0]
        g = torch.full((b,), float(guidance) * 1000.0, device=noisy.device, dtype=dtype) if self.guidance_embeds else None
        # the timestep in float32, exact: the model computes its sinusoid in float32 from what it is given (and its
        # MLP in the compute dtype under autocast), as the training references feed it (sd-scripts the integer
        # ⌊σ·1000⌋, diffusion-pipe float32 σ·1000); cast to bf16 it would be rounded to a multiple of 4 above 512
        return transformer(hidden_states=noisy.to(dtype), timestep=t.float() * 1000.0,
                           encoder_hidden_states=text["prompt_embeds"].to(dtype),
                           encoder_attention_mask=text["prompt_embeds_mask"],
                           encoder_hidden_states_2=text["prompt_embeds_2"].to(dtype),
                           encoder_attention_mask_2=text["prompt_embeds_mask_2"], guidance=g, return_dict=False)[0]

    # ------------------------------------------------------------------------------------- outputs
    def lora_files(self, fmt: str, transformer_sd: dict[str, Any], te_sd: dict[str, Any], *, rank: int,
                   alpha: float, te_rank: int | None, metadata: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        """``diffusers``: ``transformer.<module>.lora_A/B.weight`` with ``alpha/rank`` folded into ``lora_B``
        (``transformer.load_lora_adapter(path, prefix="transformer")`` loads it). ``comfyui``: the
        ``diffusion_model.`` layout of the original HunyuanImage modules (fused q/k/v and ``linear1``, scale folded
        in, no alpha), which ComfyUI loads. ``kohya``: sd-scripts' ``lora_unet_`` names with alphas and ``ss_*``
        metadata (``networks.lora_hunyuan_image``), for sd-scripts."""
        from . import lora as hunyuan_image

        scale = alpha / rank
        if fmt == "diffusers":
            out = {f"transformer.{k}": (v * scale if (".lora_B." in k and scale != 1.0) else v)
                   for k, v in transformer_sd.items()}
            return out, {"format": "pt", **metadata}
        prefixed = {f"transformer.{k}": v for k, v in transformer_sd.items()}
        if fmt == "kohya":
            return (hunyuan_image.diffusers_to_sd_scripts(prefixed, alpha=alpha, rank=rank),
                    hunyuan_image.kohya_metadata(**metadata))
        return hunyuan_image.diffusers_to_comfy(prefixed, alpha=alpha, rank=rank), {"format": "pt", **metadata}

    # ----------------------------------------------------------------------------------- inference
    def _scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        try:
            return self.from_source(FlowMatchEulerDiscreteScheduler, "scheduler", subfolder="scheduler")
        except Exception:  # noqa: BLE001 - the 2.1 scheduler config is known
            return FlowMatchEulerDiscreteScheduler(shift=5.0)

    def load_pipeline(self, device: Any, dtype: Any) -> Any:
        from diffusers import HunyuanImagePipeline

        return self.assemble_pipeline(HunyuanImagePipeline, device, dtype)

    def load_lora_into_pipeline(self, pipe: Any, path: Path, adapter_name: str = "identity") -> None:
        """Either output format: a ComfyUI file is converted with ``comfy_to_diffusers`` first; both load with
        ``pipe.transformer.load_lora_adapter`` (the pipeline has no LoRA loader)."""
        load_hunyuan_image_lora(pipe.transformer, path, adapter_name)

    def sampling_pipeline(self, transformer: Any) -> Any:
        from diffusers import HunyuanImagePipeline

        pipe = HunyuanImagePipeline(scheduler=self._scheduler(), vae=self.sample_vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate_batch(self, pipe: Any, *, prompt: str | Sequence[str] | None, seeds: Sequence[int], steps: int,
                       guidance: float, width: int, height: int, lora_scale: float,
                       text: dict[str, Any] | None = None) -> list:
        """One image per seed from one pipeline call (batched starting latents, one per seed). One prompt goes to
        the pipeline once with ``num_images_per_prompt`` = the seeds (it repeats the encodings); per-seed prompts
        go as a list, one image each (with one, diffusers 0.42.1's ``encode_prompt`` would repeat the masks in
        another order than the embeddings), their ByT5 input computed per prompt (``glyph_embeds``). Pre-encoded
        ``text`` has one row per seed (a batch of 1 is repeated). Qwen pads to its fixed length and ByT5 to 128
        tokens, with masks, and the transformer reorders each row's tokens by its own masks, so a row does not
        depend on the others. The base model has no guidance embedding and the pipeline built here has no guider,
        so sampling runs without classifier-free guidance (``guidance`` feeds only a distilled model)."""
        device, dtype = self.pipe_placement(pipe)
        if text is not None:
            kwargs = self.pipe_text(pipe, text_rows(text, len(seeds)), ("prompt_embeds", "prompt_embeds_2"),
                                    ("prompt_embeds_mask", "prompt_embeds_mask_2"))
            per_prompt = 1
        else:
            # the pipeline's own glyph extraction also quotes with ASCII apostrophes; the ByT5 input is computed
            # here with the reference rule (glyph_text), the same as in training
            shared, per_prompt = pipeline_prompt(prompt, seeds)
            glyphs = [shared] if isinstance(shared, str) else shared
            embeds_2, mask_2 = glyph_embeds(pipe.tokenizer_2, pipe.text_encoder_2, glyphs, device)
            kwargs = {"prompt": shared, "prompt_embeds_2": embeds_2.to(device, dtype), "prompt_embeds_mask_2": mask_2}
        noise = self.initial_noise(pipe, seeds, height, width)
        result = pipe(num_inference_steps=steps, height=height, width=width, distilled_guidance_scale=guidance,
                      num_images_per_prompt=per_prompt, latents=noise, attention_kwargs={"scale": float(lora_scale)},
                      output_type="pil", **kwargs)
        return list(result.images)


GLYPH_RULE = "ref-quotes"     # in the text cache identity: caches made with diffusers' rule are not reused
#: Quotation marks that delimit glyph text, as Tencent's HunyuanImage-2.1 pipeline and sd-scripts read them:
#: ASCII double quotes, then ‘…’, then “…”. ASCII single quotes are *not* quotation marks (apostrophes: "the
#: man's face, the woman's hat" quotes nothing); diffusers 0.42.1's ``extract_glyph_text`` differs here.
GLYPH_QUOTES = (('"', '"'), ("\u2018", "\u2019"), ("\u201c", "\u201d"))


def glyph_text(caption: str) -> str | None:
    """The ByT5 input of a caption: every quoted span (shortest match, per quote kind in the order of
    ``GLYPH_QUOTES``) as ``Text "<span>". `` concatenated; None when nothing is quoted."""
    import re

    spans: list[str] = []
    for opening, closing in GLYPH_QUOTES:
        spans += re.findall(re.escape(opening) + "(.*?)" + re.escape(closing), caption)
    return "".join(f'Text "{span}". ' for span in spans) if spans else None


def glyph_embeds(tokenizer: Any, encoder: Any, captions: list[str], device: Any) -> tuple[Any, Any]:
    """ByT5 hidden states and masks of the captions' glyph text ``(B, 128, d)`` / ``(B, 128)`` (long), computed
    with ``HunyuanImagePipeline._get_byt5_prompt_embeds``; zeros and an empty mask without quoted text."""
    import torch
    from diffusers import HunyuanImagePipeline

    embeds, masks = [], []
    with torch.no_grad():
        for caption in captions:
            glyph = glyph_text(caption or "")
            if glyph is None:
                embeds.append(torch.zeros((1, BYT5_MAX_LENGTH, encoder.config.d_model), device=device,
                                          dtype=encoder.dtype))
                masks.append(torch.zeros((1, BYT5_MAX_LENGTH), device=device, dtype=torch.long))
            else:
                e, m = HunyuanImagePipeline._get_byt5_prompt_embeds(
                    None, tokenizer=tokenizer, text_encoder=encoder, prompt=glyph, device=device, dtype=encoder.dtype,
                    tokenizer_max_length=BYT5_MAX_LENGTH)
                embeds.append(e)
                masks.append(m.long())
    return torch.cat(embeds), torch.cat(masks)


def _template() -> str:
    import inspect

    from diffusers import HunyuanImagePipeline

    return inspect.signature(HunyuanImagePipeline._get_qwen_prompt_embeds).parameters["template"].default


def load_hunyuan_image_lora(transformer: Any, path: Path, adapter_name: str = "identity") -> None:
    """Load a HunyuanImage-2.1 LoRA file (our diffusers or ComfyUI format, or a kohya file) into a transformer."""
    from lora_run.errors import OutputError
    from lora_run_formats import load_lora
    from .lora import comfy_to_diffusers, detect_layout, kohya_to_diffusers

    try:
        tensors, _ = load_lora(path)
    except Exception as exc:  # noqa: BLE001
        raise OutputError(f"{path}: not a readable safetensors LoRA ({first_line(exc)})") from None
    try:
        layout = detect_layout(tensors)
        if layout == "comfy":
            tensors = comfy_to_diffusers(tensors)
        elif layout == "kohya":
            tensors = kohya_to_diffusers(tensors)
        require_lora_fit({"transformer": transformer}, tensors, path, "HunyuanImage-2.1")
        transformer.load_lora_adapter(tensors, prefix="transformer", adapter_name=adapter_name)
    except OutputError:      # require_lora_fit's, naming the file and a tensor
        raise
    except Exception as exc:  # noqa: BLE001 - a conversion's error or diffusers' own refusal
        raise OutputError(f"{path}: cannot load this LoRA into HunyuanImage-2.1 ({first_line(exc)})") from None


ModelAdapter  # re-exported name for type checkers
