"""FLUX.1-dev adapter: diffusers ``FluxTransformer2DModel`` + ``FluxPipeline`` components.

Sources: ``[model] source`` (hub id or local diffusers folder) and/or ``[model.files]`` single files
(``transformer`` in BFL layout, ``vae`` = ``ae.safetensors`` in LDM layout, ``clip_l``, ``t5xxl``). A component
given as a file is read from the file; its config comes from ``source`` when that has one, else it is
inferred from the tensor shapes. Components not given as files come from ``source``. The tokenizers come
from ``source`` (``tokenizer/``, ``tokenizer_2/``) or, without a source, from the hub ids
``openai/clip-vit-large-patch14`` and ``google/t5-v1_1-xxl`` (the ones FLUX uses; cached copies only when
offline).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_run_native.adapters.base import (COMMON_FEATURES, FLOW_FEATURES, MMDIT_TARGET_PRESETS, ModelAdapter, first_line,
                                           matches_module, require_lora_fit, mmdit_fit,
                                           is_local_source, pipeline_prompt, quiet_libraries, seed_generators,
                                           seeded_noise, text_rows)
from lora_run_formats import config_fit as cf
from lora_run_formats import layouts
from lora_run_formats.model_files import config_json
from lora_run_flux.lora import lora_targets as flux_lora_targets
from lora_run_native.shapes import FamilyShape, mmdit_lora_inputs, mmdit_lora_shapes

SUBFOLDER = {"transformer": "transformer", "vae": "vae", "clip_l": "text_encoder", "t5xxl": "text_encoder_2"}
TOKENIZER_SUBFOLDER = {"clip_l": "tokenizer", "t5xxl": "tokenizer_2"}
DEFAULT_TOKENIZERS = {"clip_l": ("openai/clip-vit-large-patch14", None), "t5xxl": ("google/t5-v1_1-xxl", None)}
#: FLUX.1's Linear layers outside the blocks (diffusers name → kohya module after ``lora_unet_``): `[lora] modules`
#: can target them, the presets never do
TOP_LEVEL = {"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
             "proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1"}
WHAT = {"transformer": "FLUX transformer", "vae": "FLUX autoencoder", "clip_l": "CLIP-L text encoder",
        "t5xxl": "T5-XXL text encoder"}



class FluxAdapter(ModelAdapter):
    """FLUX.1-dev: rectified flow on packed 2×2 latent patches, CLIP-L pooled + T5-XXL sequence conditioning,
    distilled guidance embedding."""

    family = "flux.1-dev"
    pixel_multiple = 16
    objective = "flow"
    features = COMMON_FEATURES | FLOW_FEATURES | {"guidance", "text_encoder_training", "fp8", "fp8_matmul"}
    reasons = {"min_snr_gamma": "Min-SNR-γ is defined for DDPM noise schedules; flow matching has no "
                                "alphas_cumprod (use train.timestep_weighting or the pseudo-huber loss)"}
    target_presets = MMDIT_TARGET_PRESETS
    lora_formats = ("kohya", "diffusers")
    lora_targets = staticmethod(flux_lora_targets)
    format_notes = {"comfyui": "ComfyUI loads FLUX.1's kohya and diffusers files directly; no separate comfyui "
                               "file is written"}
    text_encoders = ("clip_l", "t5xxl")
    trainable_text_encoder = "clip_l"
    default_hub_id = "black-forest-labs/FLUX.1-dev"
    file_keys = ("transformer", "vae", "clip_l", "t5xxl")
    cache_tag = "flux"
    encoder_sources = (("clip", "text_encoder", "clip_l"), ("t5", "text_encoder_2", "t5xxl"))
    vae_scale_factor = 8
    SUBFOLDER = SUBFOLDER
    #: what each component's config.json declares and where the weights hold it, in a diffusers folder and in the
    #: single files (BFL's transformer, the LDM autoencoder; the text encoders' files are in transformers' layout)
    config_fits = {"transformer": mmdit_fit("transformer_blocks", "single_transformer_blocks", r"x_embedder\.weight",
                                            r"context_embedder\.weight", "joint_attention_dim")
                   + (cf.Width(("pooled_projection_dim",), r"time_text_embed\.text_embedder\.linear_1\.weight", 1),),
                   "vae": cf.AUTOENCODER_KL, "text_encoder": cf.CLIP_TEXT, "text_encoder_2": cf.T5_ENCODER}
    file_fits = {"transformer": mmdit_fit("double_blocks", "single_blocks", r"img_in\.weight", r"txt_in\.weight",
                                          "joint_attention_dim")
                 + (cf.Width(("pooled_projection_dim",), r"(?:.*\.)?vector_in\.in_layer\.weight", 1),),
                 "vae": cf.AUTOENCODER_FILE, "clip_l": cf.CLIP_TEXT, "t5xxl": cf.T5_ENCODER}
    #: the single-file layouts ``files`` converts (BFL's transformer, the LDM autoencoder, transformers' encoders)
    file_layouts = {"transformer": (layouts.FLUX1_TRANSFORMER,), "vae": (layouts.FLUX1_VAE,),
                    "clip_l": (layouts.CLIP_TEXT,), "t5xxl": (layouts.T5_ENCODER,)}
    #: what the other files' widths are to BFL's transformer: CLIP's pooled output enters `vector_in`, T5's hidden
    #: states `txt_in`, the latents packed 2 × 2 `img_in`
    file_links = (layouts.Link("clip_l", layouts.CLIP_HIDDEN, r"(?:^|\.)vector_in\.in_layer\.weight$", "is {} wide",
                               known=layouts.CLIP_WIDTHS),
                  layouts.Link("t5xxl", layouts.T5_HIDDEN, r"(?:^|\.)txt_in\.weight$", "is {} wide",
                               known=layouts.T5_WIDTHS),
                  layouts.Link("vae", layouts.LATENT, r"(?:^|\.)img_in\.weight$", "has {} latent channels", factor=4,
                               known=layouts.LATENT_CHANNELS))
    pipeline_names = ("FluxPipeline",)
    COMPONENTS = {"transformer": ("diffusers", "FluxTransformer2DModel", "torch_dtype", {}),
                  "vae": ("diffusers", "AutoencoderKL", "torch_dtype", {}),
                  "clip_l": ("transformers", "CLIPTextModel", "dtype", {}),
                  "t5xxl": ("transformers", "T5EncoderModel", "dtype", {})}
    #: for the memory model (perfmodel.py); activation bytes per token measured on an H100 (bench/flux_bench.py);
    #: whole-step CUDA graphs measured on the H100 and the H200 (the fast recipe through the CLI, 2026-12-05)
    memory_shape = FamilyShape(11.90e9, 57, 3072, 16, 512, 80_500.0, 100_000.0, mmdit_lora_shapes(19, 38, 3072, 12288),
                               lora_inputs_per_token=mmdit_lora_inputs(19, 38, 3072, 12288), whole_step_graphs=True)

    def __init__(self, recipe: Any, **kw: Any):
        super().__init__(recipe, **kw)
        self.guidance_embeds = True
        self.tokenizers: dict[str, Any] = {}
        self._configs: dict[str, dict] = {}
        self._image_ids: dict[tuple, Any] = {}     # per latent size: diffusers builds them on the host every call

    @property
    def max_sequence_length(self) -> int:
        value = getattr(self.options, "text_max_length", None)
        return min(512, value) if value else 512

    # ---------------------------------------------------------------------------------------- sources
    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        problems = super().check_sources()
        m = self.recipe.model
        if m.source is None:
            missing = [k for k in self.file_keys if m.files.get(k) is None]
            for key in missing:
                problems.append((("model", "files", key), "is required when [model.source] is not set (or set "
                                 "[model.source] to a diffusers folder / hub id that provides it)"))
        elif is_local_source(m.source) and os.path.isdir(m.source):
            src = Path(m.source)
            for key in self.file_keys:
                if m.files.get(key) is None and not os.path.isdir(src / SUBFOLDER[key]):
                    problems.append((("model", "source"), f"{src} has no {SUBFOLDER[key]}/ folder (the {WHAT[key]}); "
                                     f"it is not a FLUX diffusers folder — or give [model.files.{key}]"))
            for key, sub in TOKENIZER_SUBFOLDER.items():
                if not os.path.isdir(src / sub):
                    problems.append((("model", "source"), f"{src} has no {sub}/ folder (the {WHAT[key]}'s "
                                     "tokenizer)"))
        return problems

    def _from_source(self, cls: Any, subfolder: str, key: str, **kw: Any) -> Any:
        return self.load_from_source(cls, subfolder, f"the {WHAT.get(key, key)}", **kw, missing=(
            f"model.files.{key}", "is required when [model.source] is not set"))

    def _read_file(self, key: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        path = Path(self.recipe.model.files.get(key))
        if not os.path.isfile(path):
            raise self.error(f"model.files.{key}", f"file not found: {path}")
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise self.error(f"model.files.{key}", f"{path.name} is not a readable safetensors file ({exc})") from None

    def _source_config(self, cls: Any, key: str) -> dict | None:
        """The component's config from `model.source` (local folder or hub cache), or None."""
        src = self._source()
        if src is None:
            return None
        sub = SUBFOLDER[key]
        if is_local_source(src):
            path = Path(src) / sub / "config.json"
            return config_json(path)
        try:
            config = cls.load_config(src, subfolder=sub, **self.source_kwargs()) if hasattr(cls, "load_config") \
                else cls.config_class.from_pretrained(src, subfolder=sub, **self.source_kwargs()).to_dict()
            return dict(config)
        except Exception:  # noqa: BLE001 - fall back to inferring from the tensors
            return None

    def _instantiate(self, build: Any, state: dict[str, Any], key: str, dtype: Any, *, strict: bool = True) -> Any:
        """Build a model without initialising weights and load ``state`` into it (names the file on mismatch)."""
        import torch
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = build()
        own = model.state_dict()
        state = _match_text_model_prefix(state, own)
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or shape or (strict and unexpected):
            path = self.recipe.model.files.get(key)
            detail = (f"missing {missing[:3]}" if missing else f"shape mismatch at {shape[:3]}" if shape
                      else f"unexpected {unexpected[:3]}")
            raise self.error(f"model.files.{key}", f"{Path(path).name} does not match the {WHAT[key]} config "
                             f"({detail})")
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k in own}
        model.load_state_dict(state, strict=False, assign=True)
        if hasattr(model, "tie_weights"):
            try:
                model.tie_weights()
            except Exception:  # noqa: BLE001 - tying is a nicety for T5's shared embedding
                pass
        for name, buf in list(model.named_buffers()):
            if buf.device.type == "meta":
                raise self.error(f"model.files.{key}", f"buffer {name} could not be materialised")
        return model.to(torch.device("cpu"))

    def _load_file(self, key: str, dtype: Any) -> Any:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from . import files as ff

        raw = self._read_file(key)
        name = Path(self.recipe.model.files.get(key)).name
        try:
            if key == "transformer":
                state = ff.transformer_bfl_to_diffusers(raw)
                config = self._source_config(FluxTransformer2DModel, key) or ff.infer_transformer_config(state)
                self._configs[key] = config
                return self._instantiate(lambda: FluxTransformer2DModel.from_config(config), state, key, dtype)
            if key == "vae":
                state = ff.vae_ldm_to_diffusers(raw)
                config = self._source_config(AutoencoderKL, key) or ff.infer_vae_config(state)
                self._configs[key] = config
                return self._instantiate(lambda: AutoencoderKL.from_config(config), state, key, dtype)
            if key == "clip_l":
                state = ff.clip_state_dict(raw)
                tok = self.tokenizers["clip_l"]
                config = self._source_config(CLIPTextModel, key) or ff.infer_clip_config(
                    state, bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
                config = {k: v for k, v in config.items() if not k.startswith("_")}
                return self._instantiate(lambda: CLIPTextModel(CLIPTextConfig(**config)), state, key, dtype,
                                         strict=False)
            state = ff.t5_state_dict(raw)
            config = self._source_config(T5EncoderModel, key) or ff.infer_t5_config(state)
            config = {k: v for k, v in config.items() if not k.startswith("_")}
            return self._instantiate(lambda: T5EncoderModel(T5Config(**config)), state, key, dtype, strict=False)
        except ff.LayoutError as exc:
            raise self.error(f"model.files.{key}", f"{name} does not look like a {WHAT[key]}: {exc}") from None

    def _from_subfolder(self, cls: Any, key: str, **kw: Any) -> Any:
        return self._from_source(cls, SUBFOLDER[key], key, **kw)

    def _load_tokenizers(self) -> None:
        from transformers import CLIPTokenizer, T5Tokenizer

        quiet_libraries()
        for key, cls in (("clip_l", CLIPTokenizer), ("t5xxl", T5Tokenizer)):
            if key in self.tokenizers:
                continue
            src = self._source()
            if src is not None:
                tok = self._from_source(cls, TOKENIZER_SUBFOLDER[key], key)
                if not _real_tokenizer(tok):
                    raise self.error("model.source", f"{src}/{TOKENIZER_SUBFOLDER[key]}: no {WHAT[key]} tokenizer "
                                     "files there" + (self.cache_hint() or " (or not in the local cache while offline)"))
                self.tokenizers[key] = tok
                continue
            repo, _ = DEFAULT_TOKENIZERS[key]
            why = "its files are not in the local cache"
            try:
                tok = cls.from_pretrained(repo, **self.source_kwargs())
            except Exception as exc:  # noqa: BLE001
                tok, why = None, first_line(exc)
            if tok is None or not _real_tokenizer(tok):
                raise self.error("model.source", f"is not set, so the {WHAT[key]}'s tokenizer is taken from the "
                                 f"hub model {repo}, which could not be loaded ({why}); set [model.source] to a "
                                 "folder with tokenizer/ and tokenizer_2/ (or a FLUX.1-dev hub id)")
            self.tokenizers[key] = tok

    def vae_factor(self, vae: Any) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def load_transformer(self) -> Any:
        quiet_libraries()
        model = self._component("transformer", self.compute_dtype)
        model.requires_grad_(False)
        self.guidance_embeds = bool(model.config.guidance_embeds)
        return model

    def text_settings(self) -> str:
        return f"len:{self.max_sequence_length}"

    # --------------------------------------------------------------------------------------- encoding
    def encode_images(self, pixels: Any) -> Any:
        import torch

        vae = self.encoders["vae"]
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            z = dist.mode()
        shift = vae.config.shift_factor or 0.0
        return ((z - shift) * vae.config.scaling_factor).float()

    def text_keys(self, encoder: str) -> tuple[str, ...]:
        return {"clip_l": ("pooled_prompt_embeds",), "t5xxl": ("prompt_embeds",)}[encoder]

    def text_shapes(self, encoder: str) -> dict[str, tuple[int | None, ...]]:
        """CLIP-L's pooled output (its ``hidden_size``) and T5's ``max_sequence_length`` tokens (padded to it) of
        its ``d_model``."""
        if encoder == "clip_l":
            return {"pooled_prompt_embeds": (self.encoder_width("clip_l", "hidden_size"),)}
        return {"prompt_embeds": (self.max_sequence_length, self.encoder_width("t5xxl", "d_model"))}

    def encode_captions(self, captions: list[str], encoders: tuple[str, ...] | None = None) -> dict[str, Any]:
        import torch

        encoders = encoders or self.text_encoders
        out: dict[str, Any] = {}
        if "clip_l" in encoders:
            tok, model = self.tokenizers["clip_l"], self.encoders["clip_l"]
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())):
                out["pooled_prompt_embeds"] = model(ids, output_hidden_states=False).pooler_output
        if "t5xxl" in encoders:
            tok, model = self.tokenizers["t5xxl"], self.encoders["t5xxl"]
            ids = tok(captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            with torch.no_grad():
                out["prompt_embeds"] = model(ids, output_hidden_states=False)[0]
        return out

    def text_encoder_targets(self, module: Any) -> list[str]:
        import torch

        return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)
                and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")]

    # -------------------------------------------------------------------------------------- objective
    def image_seq_len(self, latents: Any) -> int:
        return int((latents.shape[-1] // 2) * (latents.shape[-2] // 2))

    def predict(self, transformer: Any, noisy: Any, t: Any, text: dict[str, Any], guidance: float) -> Any:
        import torch
        from diffusers import FluxPipeline

        dtype = self.compute_dtype
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w).to(dtype)
        key = (h, w, str(noisy.device), dtype)
        if key not in self._image_ids:    # built on the host and copied: a sync, once per size instead of per step
            self._image_ids[key] = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        img_ids = self._image_ids[key]
        prompt = text["prompt_embeds"].to(dtype)
        txt_ids = torch.zeros(prompt.shape[1], 3, device=noisy.device, dtype=dtype)
        g = torch.full((b,), float(guidance), device=noisy.device, dtype=dtype) if self.guidance_embeds else None
        out = transformer(hidden_states=packed, encoder_hidden_states=prompt,
                          pooled_projections=text["pooled_prompt_embeds"].to(dtype), timestep=t.to(dtype),
                          img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)

    # ---------------------------------------------------------------------------------------- outputs
    def lora_format_notes(self) -> list[str]:
        """The kohya file of a LoRA on layers outside the blocks (`[lora] modules` only): sd-scripts'
        ``networks.lora_flux`` creates no module for the final layer, and its loader (``load_state_dict(…,
        strict=False)``) drops ``lora_unet_final_layer_*`` without a word; diffusers' kohya converter drops every
        top-level layer (docs/lora-formats.md). ComfyUI loads them all, diffusers the diffusers file."""
        r = self.recipe
        if "kohya" not in r.output.formats or not r.lora.modules:
            return []
        hit = [name for name in TOP_LEVEL if matches_module(name, r.lora.modules)]
        notes = []
        final = [name for name in hit if TOP_LEVEL[name].startswith("final_layer")]
        if final:
            notes.append("kohya file: sd-scripts (networks.lora_flux) does not load the LoRA of the final layer ("
                         + ", ".join(f"{n} → lora_unet_{TOP_LEVEL[n]}" for n in final) + "): its loader drops "
                         "those keys without a warning; ComfyUI loads them, and diffusers does from the diffusers file")
        if hit:
            notes.append("kohya file: diffusers' kohya loader (load_lora_weights on the kohya file) drops the LoRA of "
                         "the layers outside the blocks (" + ", ".join(hit) + "); give diffusers the diffusers file")
        return notes

    def lora_files(self, fmt: str, transformer_sd: dict[str, Any], te_sd: dict[str, Any], *, rank: int,
                   alpha: float, te_rank: int | None, metadata: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        te_rank = te_rank or rank
        te_alpha = alpha * te_rank / rank
        # canonical CLIP names (`text_model.encoder.layers.N…`, as sd-scripts/ComfyUI and transformers 4 have
        # them); transformers 5 drops the `text_model` level but still loads such keys
        te_sd = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in te_sd.items()}
        if fmt == "diffusers":
            out = {}
            for prefix, sd, scale in (("transformer.", transformer_sd, alpha / rank),
                                      ("text_encoder.", te_sd, te_alpha / te_rank)):
                for k, v in sd.items():
                    out[prefix + k] = v * scale if (".lora_B." in k and scale != 1.0) else v
            return out, {"format": "pt", **metadata}
        from .lora import diffusers_to_kohya, kohya_metadata

        out = diffusers_to_kohya({f"transformer.{k}": v for k, v in transformer_sd.items()}, alpha=alpha, rank=rank)
        if te_sd:
            out.update(diffusers_to_kohya({f"text_encoder.{k}": v for k, v in te_sd.items()}, alpha=te_alpha,
                                          rank=te_rank))
        return out, kohya_metadata(**metadata)

    # -------------------------------------------------------------------------------------- inference
    def _scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        src = self._source()
        if src is not None:
            try:
                return FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler", **self.source_kwargs())
            except Exception:  # noqa: BLE001 - FLUX.1-dev's scheduler config is known
                pass
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)

    def load_pipeline(self, device: Any, dtype: Any) -> Any:
        from diffusers import FluxPipeline

        return self.assemble_pipeline(FluxPipeline, device, dtype)

    def file_layer_shapes(self, key: str, header: dict[str, Any]) -> dict[str, list[int] | None] | None:
        """A ``[model.files] transformer`` in BFL's layout: its layers in diffusers' names, from the header."""
        from lora_run_formats.config_fit import header_shapes

        from .files import transformer_bfl_layer_shapes

        return transformer_bfl_layer_shapes(header_shapes(header)) if key == "transformer" else None

    def load_lora_into_pipeline(self, pipe: Any, path: Path, adapter_name: str = "identity") -> None:
        """A diffusers-format file goes to ``load_lora_weights`` as is. A kohya file is converted with
        ``lora_run_formats.flux.kohya_to_diffusers`` first: exact for any model width (diffusers' own kohya
        converter assumes FLUX.1's full width for the fused ``linear1`` and drops some top-level layers)."""
        from lora_run.errors import OutputError
        from lora_run_formats import detect_format, load_lora
        from .lora import kohya_to_diffusers

        try:
            tensors, _ = load_lora(path)
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"{path}: not a readable safetensors LoRA ({first_line(exc)})") from None
        try:
            kohya = detect_format(tensors) == "kohya"
            if kohya:
                tensors = kohya_to_diffusers(tensors)
            require_lora_fit(pipe.components, tensors, path, "FLUX.1")
            pipe.load_lora_weights(tensors if kohya else str(path), adapter_name=adapter_name)
        except OutputError:      # require_lora_fit's, naming the file and a tensor
            raise
        except Exception as exc:  # noqa: BLE001 - a conversion's FormatError or diffusers' own refusal
            raise OutputError(f"{path}: cannot load this LoRA into FLUX.1 ({first_line(exc)})") from None

    def sampling_pipeline(self, transformer: Any) -> Any:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=self._scheduler(), vae=self.sample_vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate_batch(self, pipe: Any, *, prompt: str | Sequence[str] | None, seeds: Sequence[int], steps: int,
                       guidance: float, width: int, height: int, lora_scale: float,
                       text: dict[str, Any] | None = None) -> list:
        """One image per seed from one pipeline call (batched starting latents, one per seed). One prompt goes to
        FluxPipeline once, with ``num_images_per_prompt`` = the seeds; per-seed prompts go as a list, one image
        each (CLIP and T5 pad to their fixed lengths, so a row's encoding does not depend on the others).
        FluxPipeline does not repeat pre-encoded ``text``: a batch of 1 is repeated here, one row per seed taken
        as it is."""
        kwargs: dict[str, Any] = {}
        dtype = self._pipe_dtype(pipe)
        if text is not None:
            device = pipe._execution_device
            keys = ("prompt_embeds", "pooled_prompt_embeds")
            kwargs.update(text_rows({key: text[key].to(device, dtype) for key in keys}, len(seeds)))
        else:
            kwargs["prompt"], kwargs["num_images_per_prompt"] = pipeline_prompt(prompt, seeds)
        latents = self._initial_latents(pipe, seeds, width, height)
        result = pipe(num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                      generator=seed_generators(seeds), latents=latents, max_sequence_length=self.max_sequence_length,
                      joint_attention_kwargs={"scale": float(lora_scale)}, output_type="pil", **kwargs)
        return list(result.images)

    def _initial_latents(self, pipe: Any, seeds: Sequence[int], width: int, height: int) -> Any:
        """Starting noise drawn on CPU, one row per seed, so a seed gives the same image on CPU and CUDA and in
        any batch; packed to FLUX's 2×2 tokens."""
        from diffusers import FluxPipeline

        h = 2 * (height // (self.vae_scale_factor * 2))
        w = 2 * (width // (self.vae_scale_factor * 2))
        channels = pipe.transformer.config.in_channels // 4
        noise = seeded_noise(seeds, (channels, h, w))
        packed = FluxPipeline._pack_latents(noise, len(seeds), channels, h, w)
        return packed.to(pipe._execution_device, self._pipe_dtype(pipe))

    def _pipe_dtype(self, pipe: Any) -> Any:
        """The compute dtype of a pipeline we built (with fp8 storage the weights' dtype is not it)."""
        return getattr(pipe, "_lora_run_dtype", None) or self.compute_dtype


def _match_text_model_prefix(state: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """CLIP files name tensors `text_model.…`; transformers 5's CLIPTextModel has no `text_model` level."""
    has = any(k.startswith("text_model.") for k in state)
    wants = any(k.startswith("text_model.") for k in own)
    if has and not wants:
        return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    if wants and not has and any(k.startswith("embeddings.") for k in state):
        return {f"text_model.{k}": v for k, v in state.items()}
    return state


def _real_tokenizer(tok: Any) -> bool:
    """transformers 5 returns an *empty* tokenizer (special tokens only) for a repo whose files are missing
    offline instead of failing; such a tokenizer would silently encode every caption the same way."""
    return len(tok) > len(set(tok.all_special_tokens)) + 10
