"""Native-backend adapters for FLUX.2 [klein] and [dev] (diffusers ``Flux2Transformer2DModel``,
``AutoencoderKLFlux2``, ``Flux2KleinPipeline`` / ``Flux2Pipeline``).

What each step does, following diffusers' FLUX.2 DreamBooth-LoRA examples (``train_dreambooth_lora_flux2.py``,
``train_dreambooth_lora_flux2_klein.py``) — the parity tests in ``tests/parity/test_flux2_parity.py`` check each:

* latents: the VAE posterior mode, 2×2-patchified to 128 channels and normalised with the VAE's batch-norm
  statistics (``latents.py``); noise, x_t = (1−σ)·x0 + σ·ε and the target ε − x0 live in that space;
* the transformer gets the tokens packed row-major, ids (0, row, col, 0) and (0, 0, 0, k), σ as ``timestep``
  (it multiplies by 1000 itself), the caption as stacked hidden states of the text encoder (Qwen3 layers
  9/18/27 for [klein], Mistral-3 layers 10/20/30 with FLUX.2's system message for [dev]);
* guidance: [dev] has a guidance embedding and is fed ``train.guidance`` (diffusers' ``--guidance_scale``);
  [klein] has none (``guidance=None``), base and distilled alike;
* ``timestep_sampling = "flux-shift"``: the shared sampler's μ line (0.5 at 256 tokens, 1.15 at 4096, on the h·w
  packed tokens) is FLUX.2's own step-independent μ — ``compute_empirical_mu(tokens, 200)`` of its pipelines, the
  μ they use at every step count above 4300 tokens — and musubi-tuner's ``flux2_shift``; the pipelines' μ at
  fewer steps and ≤ 4300 tokens is larger (docs/flux2.md says why training does not follow it).

Sources: ``[model] source`` (hub id or diffusers folder) and/or ``[model.files]``: ``transformer`` (BFL/ComfyUI
single file), ``vae`` (BFL ``flux2-vae.safetensors``), and the text encoder (``qwen3`` / ``mistral``, one file in
transformers' layout). A component given as a file is read from it; its config comes from ``source`` (the
default hub id when none is set), the transformer's is inferred from the tensors when there is none.
No torch at import (``lora-run check``/``plugins`` import this module).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from lora_run_native.adapters.base import (COMMON_FEATURES, FLOW_FEATURES, ModelAdapter, first_line, hub_offline,
                                           require_lora_fit, mmdit_fit,
                                           image_rows, is_local_source, pipeline_prompt, quiet_libraries,
                                           seed_generators, seeded_noise)
from lora_run_flux.adapter import FluxAdapter
from lora_run_formats import config_fit as cf
from lora_run_formats import layouts
from lora_run_formats.model_files import config_json
from lora_run_flux2.formats import lora_targets as flux2_lora_targets

from .shapes import DEV_SHAPE, KLEIN_4B_SHAPE, KLEIN_9B_SHAPE, KLEIN_SHAPE

_DOUBLE_ATTN = [r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)"]
_SINGLE = [r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"]
_DOUBLE_MLP = [r"transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)"]
_MODULATION = [r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear"]
#: LoRA target presets. FLUX.2's single blocks fuse attention with the MLP (one input and one output
#: projection), so "attention" takes them whole — the set diffusers' [klein] example trains by default.
TARGET_PRESETS: dict[str, list[str]] = {
    "attention": _DOUBLE_ATTN + _SINGLE,
    "attention+mlp": _DOUBLE_ATTN + _SINGLE + _DOUBLE_MLP,
    "all-linear": _DOUBLE_ATTN + _SINGLE + _DOUBLE_MLP + _MODULATION,
}
WHAT = {"transformer": "FLUX.2 transformer", "vae": "FLUX.2 autoencoder", "qwen3": "Qwen3 text encoder",
        "mistral": "Mistral-3 text encoder"}
SUBFOLDER = {"transformer": "transformer", "vae": "vae", "qwen3": "text_encoder", "mistral": "text_encoder"}
MAX_SEQUENCE_LENGTH = 512


class Flux2Adapter(ModelAdapter):
    """Shared by both variants; subclasses name the text encoder, its layers and the pipeline."""

    pixel_multiple = 16                          # 8× VAE × 2×2 patches
    objective = "flow"
    noise_offset_group = 4                       # the noise offset's δ: one per VAE channel, not per patch channel
    features = COMMON_FEATURES | FLOW_FEATURES | {"fp8", "fp8_matmul"}
    target_presets = TARGET_PRESETS
    lora_formats = ("kohya", "diffusers", "comfyui")   # <name>.safetensors, diffusers/<name>…, comfyui/<name>…
    lora_targets = staticmethod(flux2_lora_targets)
    trainable_text_encoder = None
    vae_scale_factor = 8
    variant: ClassVar[str] = ""
    text_layers: ClassVar[tuple[int, ...]] = ()
    #: the text encoder's config field of its language model's width (``text_shapes``)
    text_width_field: ClassVar[str] = "hidden_size"
    memory_shape: ClassVar[Any] = None
    SUBFOLDER = SUBFOLDER
    #: what the text encoder's config.json declares and where its weights hold it (``config_fits``), and the layout
    #: of its single file (``file_layouts``)
    text_fit: ClassVar[cf.Fit] = ()
    text_layout: ClassVar[layouts.Layout | None] = None
    transformer_class = "Flux2Transformer2DModel"

    def __init_subclass__(cls, **kw: Any):
        """A variant names itself and its text encoder; family, file slots, cache tag and the config fits
        follow."""
        super().__init_subclass__(**kw)
        te = cls.text_encoders[0]
        cls.family, cls.cache_tag = f"flux.2-{cls.variant}", f"flux2-{cls.variant}"
        cls.file_keys = ("transformer", "vae", te)
        cls.encoder_sources = ((te, "text_encoder", te),)
        cls.config_fits = {"transformer": mmdit_fit("transformer_blocks", "single_transformer_blocks",
                                                    r"x_embedder\.weight", r"context_embedder\.weight",
                                                    "joint_attention_dim"),
                           "vae": cf.AUTOENCODER_KL, "text_encoder": cls.text_fit}
        cls.file_fits = {"transformer": mmdit_fit("double_blocks", "single_blocks", r"img_in\.weight",
                                                  r"txt_in\.weight", "joint_attention_dim"),
                         "vae": cf.AUTOENCODER_FILE, te: cls.text_fit}
        cls.file_layouts = {"transformer": (layouts.FLUX2_TRANSFORMER,), "vae": (layouts.FLUX2_VAE,),
                            te: (cls.text_layout,) if cls.text_layout else ()}
        #: the transformer (BFL's or diffusers' names) takes three of the text encoder's layers side by side and
        #: the latents packed 2 × 2: a [klein] 4B transformer with the 9B's Qwen3-8B, or [dev]'s, is named
        cls.file_links = (layouts.Link(te, layouts.LM_HIDDEN, r"(?:^|\.)(?:txt_in|context_embedder)\.weight$",
                                       "is {} wide", factor=3, known=layouts.QWEN_WIDTHS),
                          layouts.Link("vae", layouts.LATENT, r"(?:^|\.)(?:img_in|x_embedder)\.weight$",
                                       "has {} latent channels", factor=4, known=layouts.LATENT_CHANNELS))

    def __init__(self, recipe: Any, **kw: Any):
        super().__init__(recipe, **kw)
        self.tokenizers: dict[str, Any] = {}
        self.guidance_embeds = False
        self.negative_text: dict[str, Any] | None = None

    @property
    def te(self) -> str:
        return self.text_encoders[0]

    @property
    def max_sequence_length(self) -> int:
        value = getattr(self.options, "text_max_length", None)
        return min(MAX_SEQUENCE_LENGTH, value) if value else MAX_SEQUENCE_LENGTH

    def text_settings(self) -> str:
        return f"len:{self.max_sequence_length}|layers:{','.join(map(str, self.text_layers))}"

    # ---------------------------------------------------------------------------------------- sources
    def hub_id(self) -> str:
        return self.default_hub_id or ""

    def _source(self) -> str | None:
        """``[model] source``; without one the variant's hub id gives tokenizer and configs."""
        return self.recipe.model.source or self.hub_id()

    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        problems = super().check_sources()
        m = self.recipe.model
        given = {k for k in self.file_keys if m.files.get(k) is not None}
        if m.source is None:
            why = (f"is required when [model.source] is not set (or set [model.source] to a {self.family} diffusers "
                   "folder / hub id that provides it)")
            problems += [(("model", "files", k), why) for k in self.file_keys if k not in given]
            if hub_offline(self.recipe) and not self.hub_cached(self.hub_id()):
                problems.append((("model", "source"), f"is not set, so the tokenizer and the configs come from the "
                                 f"hub model {self.hub_id()}, which is not in the local Hugging Face cache and "
                                 "downloads are off; set [model.source] to a folder with tokenizer/ (and the "
                                 "components' config.json) or download that model's small files first"))
            return problems
        if not is_local_source(m.source):
            return problems + self._hub_model_problems(m.source)
        if not os.path.isdir(m.source):
            return problems
        folder = Path(m.source)
        wanted = {SUBFOLDER[k]: f"the {WHAT[k]}" for k in self.file_keys if k not in given}
        wanted["tokenizer"] = f"the {WHAT[self.te]}'s tokenizer"
        problems += [(("model", "source"), f"{folder} has no {sub}/ folder ({what}); it is not a {self.family} "
                      "diffusers folder, or give that component in [model.files]")
                     for sub, what in wanted.items() if not (folder / sub).is_dir()]
        return problems

    def _hub_model_problems(self, repo: str) -> list[tuple[tuple[str, ...], str]]:
        """A hub id that is another model (a FLUX.1 recipe switched by its family line only), not in the local
        cache, whose name says FLUX.1 (a cached one is checked as a folder: ``foreign_folder``)."""
        if self.hub_snapshot(repo) is not None or "flux.1" not in repo.lower():
            return []
        return [(("model", "source"), f"{repo} is a FLUX.1 pipeline, not a {self.family} model: set it to "
                 f"{self.hub_id()} (or another {self.family} hub id / diffusers folder)")]

    def _from_source(self, cls: Any, key: str, subfolder: str | None = None, **kw: Any) -> Any:
        return self.load_from_source(cls, subfolder or SUBFOLDER[key], f"the {WHAT.get(key, key)}", **kw,
                                     missing=(f"model.files.{key}", "is required when [model.source] is not set"))

    #: reading a `[model.files]` safetensors file, errors naming the key: FLUX.1's
    _read_file = FluxAdapter._read_file

    def _instantiate(self, build: Any, state: dict[str, Any], key: str, dtype: Any, *, strict: bool = True) -> Any:
        """A model built on the meta device with ``state`` assigned to it; what does not fit names the file.
        Tensors the model does not have are an error for the diffusers components (``strict``); a text-encoder
        file may carry extra heads, and its ``lm_head`` may be tied to the input embedding."""
        from accelerate import init_empty_weights

        from .files import match_prefix

        name = Path(self.recipe.model.files.get(key)).name
        if any(k.endswith(("scale_weight", "weight_scale", "scale_input")) for k in state):
            raise self.error(f"model.files.{key}", f"{name} stores scaled-fp8 weights (ComfyUI's *_fp8 files); "
                             "give the bf16/fp16 file or load this component from [model.source] "
                             "(base_precision = \"fp8\" stores the weights in fp8 after loading)")
        import torch

        with init_empty_weights():
            model = build()
        own = model.state_dict()
        state = match_prefix(state, own)
        for k in own:                             # batch-norm step counters: not in every file
            if k.endswith("num_batches_tracked") and k not in state:
                state[k] = torch.tensor(0)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
        try:
            report = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:               # size mismatches
            raise self.error(f"model.files.{key}", f"{name} does not match the {WHAT[key]} config "
                             f"({first_line(exc)})") from None
        missing = [k for k in report.missing_keys if not k.endswith("lm_head.weight")]
        extra = list(report.unexpected_keys) if strict else []
        if missing or extra:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise self.error(f"model.files.{key}", f"{name} does not match the {WHAT[key]} config ({detail})")
        if len(missing) != len(report.missing_keys):
            model.tie_weights()
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if leftover:
            raise self.error(f"model.files.{key}", f"{name}: {leftover[0]} could not be materialised")
        return model.to("cpu")

    def _load_file_component(self, key: str, dtype: Any) -> Any:
        """A ``[model.files]`` component: its tensors in diffusers/transformers names and a builder of the
        model from its config (``_file_transformer`` / ``_file_vae`` / ``_file_encoder``)."""
        from .files import LayoutError

        reader = getattr(self, "_file_encoder" if key == self.te else f"_file_{key}")
        file_name = Path(self.recipe.model.files.get(key)).name
        try:
            build, tensors, strict = reader(self._read_file(key), file_name)
        except LayoutError as exc:
            raise self.error(f"model.files.{key}", f"{file_name} does not look like a {WHAT[key]}: {exc}") from None
        return self._instantiate(build, tensors, key, dtype, strict=strict)

    def _file_transformer(self, raw: dict[str, Any], file_name: str) -> tuple[Any, dict[str, Any], bool]:
        from diffusers import Flux2Transformer2DModel

        from .files import infer_transformer_config, transformer_bfl_to_diffusers

        tensors = transformer_bfl_to_diffusers(raw)
        config = self.source_json("transformer") or infer_transformer_config(tensors)
        return (lambda: Flux2Transformer2DModel.from_config(config)), tensors, True

    def _file_vae(self, raw: dict[str, Any], file_name: str) -> tuple[Any, dict[str, Any], bool]:
        from diffusers import AutoencoderKLFlux2

        from .files import vae_ldm_to_diffusers

        config = self.source_json("vae")
        if config is None and self.recipe.model.source != self.hub_id():
            try:
                config = dict(AutoencoderKLFlux2.load_config(self.hub_id(), subfolder="vae", **self.source_kwargs()))
            except Exception:  # noqa: BLE001 - not cached / no network: diffusers' defaults are FLUX.2's VAE
                config = None
        if config is None:                        # diffusers' defaults describe FLUX.2's autoencoder
            import inspect

            config = {name: p.default for name, p in inspect.signature(AutoencoderKLFlux2.__init__).parameters.items()
                      if p.default is not inspect.Parameter.empty}
        return (lambda: AutoencoderKLFlux2.from_config(config)), vae_ldm_to_diffusers(raw, config), True

    def _file_encoder(self, raw: dict[str, Any], file_name: str) -> tuple[Any, dict[str, Any], bool]:
        config = self.source_json("text_encoder")
        if config is None:
            raise self.error(f"model.files.{self.te}", f"{file_name}: the {WHAT[self.te]}'s config comes from "
                             f"[model.source]'s text_encoder/config.json (or the hub model {self.hub_id()}), which "
                             f"could not be read{self.cache_hint()}")
        cls, config_cls = self._encoder_classes()
        cfg = config_cls(**{k: v for k, v in config.items() if not k.startswith("_")})
        return (lambda: cls(cfg)), raw, False

    def _encoder_classes(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _load_file(self, key: str, dtype: Any) -> Any:
        return self._load_file_component(key, dtype)

    def _component(self, key: str, dtype: Any) -> Any:
        if self.recipe.model.files.get(key) is not None:
            return self.file_component(key, dtype)
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        if key == "transformer":
            return self._from_source(Flux2Transformer2DModel, key, torch_dtype=dtype)
        if key == "vae":
            return self._from_source(AutoencoderKLFlux2, key, torch_dtype=dtype)
        return self._from_source(self._encoder_classes()[0], key, dtype=dtype)

    def _load_tokenizer(self) -> Any:
        if self.te in self.tokenizers:
            return self.tokenizers[self.te]
        quiet_libraries()
        tok = self.load_from_source(self._tokenizer_class(), "tokenizer", f"the {WHAT[self.te]}'s tokenizer",
                                    missing=("model.source", "is required for the tokenizer"))
        inner = getattr(tok, "tokenizer", tok)
        if len(inner) <= len(set(inner.all_special_tokens)) + 10:     # transformers 5: empty when files are missing
            raise self.error("model.source", f"{self._source()}/tokenizer: no {WHAT[self.te]} tokenizer files there"
                             + (self.cache_hint() or " (or not in the local cache while offline)"))
        self.tokenizers[self.te] = tok
        return tok

    def _tokenizer_class(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer

    def load_encoders(self, only: tuple[str, ...] | None = None) -> None:
        dtype = self.compute_dtype
        for key in ("vae", self.te):
            if key in self.encoders or (only is not None and key not in only):
                continue
            if key == self.te:
                self._load_tokenizer()
                module = self.place_encoder(self._component(key, dtype))
            else:
                module = self.vae_with_fp32_stats(dtype).to(self.device)
            self.encoders[key] = module.requires_grad_(False).eval()

    def vae_with_fp32_stats(self, dtype: Any) -> Any:
        """The VAE in ``dtype`` with its batch-norm statistics kept in float32, as the reference reads them
        (before it casts the VAE) — in bf16 they would lose all but ~3 significant digits."""
        import torch

        vae = self._component("vae", torch.float32)
        mean, var = vae.bn.running_mean.clone(), vae.bn.running_var.clone()
        vae = vae.to(dtype)
        vae.bn.running_mean, vae.bn.running_var = mean, var
        return vae

    #: the transformer from `_component`, frozen, its `guidance_embeds` noted: FLUX.1's
    load_transformer = FluxAdapter.load_transformer

    # --------------------------------------------------------------------------------------- encoding
    def encode_images(self, pixels: Any) -> Any:
        import torch

        from .latents import normalise

        vae = self.encoders["vae"]
        with torch.no_grad():
            z = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        return normalise(z.float(), vae).float()

    def text_keys(self, encoder: str) -> tuple[str, ...]:
        return ("prompt_embeds",)

    def text_shapes(self, encoder: str) -> dict[str, tuple[int | None, ...]]:
        """``max_sequence_length`` tokens (the pipeline pads to it), each the hidden states of ``text_layers``
        side by side (their number × the language model's ``hidden_size``)."""
        width = self.encoder_width(self.te, self.text_width_field)
        return {"prompt_embeds": (self.max_sequence_length, None if width is None else len(self.text_layers) * width)}

    def encode_captions(self, captions: list[str], encoders: tuple[str, ...] | None = None) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            out = {"prompt_embeds": self._embed(captions)}
            if self.negative_text is None:          # the empty prompt, for classifier-free guidance in samples
                self.negative_text = {"prompt_embeds": self._embed([""]).to("cpu")}
        return out

    def _embed(self, captions: list[str]) -> Any:
        """diffusers' own prompt encoder of the variant's pipeline (``_encoder_call``), on our loaded parts."""
        encode, extra = self._encoder_call()
        return encode(self.encoders[self.te], self.tokenizers[self.te], captions, device=self.device,
                      max_sequence_length=self.max_sequence_length, hidden_states_layers=self.text_layers, **extra)

    def _encoder_call(self) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- objective
    def predict(self, transformer: Any, noisy: Any, t: Any, text: dict[str, Any], guidance: float) -> Any:
        import torch

        from . import latents

        dtype = self.compute_dtype
        b, _, h, w = noisy.shape
        tokens = latents.pack(noisy).to(dtype)
        prompt = text["prompt_embeds"].to(dtype)
        g = torch.full((b,), float(guidance), device=noisy.device) if self.guidance_embeds else None
        out = transformer(hidden_states=tokens, encoder_hidden_states=prompt, timestep=t.to(dtype),
                          img_ids=latents.image_ids(b, h, w, noisy.device),
                          txt_ids=latents.text_ids(b, prompt.shape[1], noisy.device), guidance=g,
                          return_dict=False)[0]
        return latents.unpack(out[:, :tokens.shape[1]], h, w)

    # ---------------------------------------------------------------------------------------- outputs
    def lora_files(self, fmt: str, transformer_sd: dict[str, Any], te_sd: dict[str, Any], *, rank: int,
                   alpha: float, te_rank: int | None, metadata: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        from . import formats

        if fmt == "diffusers":
            scale = alpha / rank
            return ({f"transformer.{k}": (v * scale if ".lora_B." in k and scale != 1.0 else v)
                     for k, v in transformer_sd.items()}, {"format": "pt", **metadata})
        if fmt == "comfyui":
            return formats.diffusers_to_comfyui(transformer_sd, alpha=alpha, rank=rank), dict(metadata)
        return (formats.diffusers_to_kohya(transformer_sd, alpha=alpha, rank=rank),
                formats.flux2_kohya_metadata(self.variant, **metadata))

    # -------------------------------------------------------------------------------------- inference
    def _scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = self.source_json("scheduler", "scheduler_config.json")
        if config is not None:
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)

    def _pipeline(self, **parts: Any) -> Any:
        raise NotImplementedError

    def load_pipeline(self, device: Any, dtype: Any) -> Any:
        tok = self._load_tokenizer()
        pipe = self._pipeline(scheduler=self._scheduler(), vae=self._component("vae", dtype),
                              text_encoder=self._component(self.te, dtype), tokenizer=tok,
                              transformer=self._component("transformer", dtype))
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        pipe._lora_run_dtype = dtype
        return pipe

    def load_lora_into_pipeline(self, pipe: Any, path: Path, adapter_name: str = "identity") -> None:
        """A diffusers file goes to diffusers' FLUX.2 loader as is; kohya and ComfyUI files are converted
        with ``formats.to_diffusers`` first (exact; diffusers' kohya reader drops the modulation layers)."""
        from lora_run.errors import OutputError
        from lora_run_formats import load_lora

        from .formats import to_diffusers

        try:
            tensors, _ = load_lora(path)
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"{path}: not a readable safetensors LoRA ({first_line(exc)})") from None
        try:
            converted = not all(k.startswith("transformer.") for k in tensors)
            if converted:
                tensors = to_diffusers(tensors)
            require_lora_fit(pipe.components, tensors, path, self.family)
            pipe.load_lora_weights(tensors if converted else str(path), adapter_name=adapter_name)
        except OutputError:      # require_lora_fit's, naming the file and a tensor
            raise
        except Exception as exc:  # noqa: BLE001 - a FormatError or diffusers' own refusal, named with the file
            raise OutputError(f"{path}: cannot load this LoRA into {self.family} ({first_line(exc)})") from None

    def sampling_pipeline(self, transformer: Any) -> Any:
        pipe = self._pipeline(scheduler=self._scheduler(), vae=self.sample_vae, text_encoder=None, tokenizer=None,
                              transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _guided(self, pipe: Any, guidance: float) -> bool:
        """Whether the pipeline runs classifier-free guidance (and so needs the empty prompt's encoding)."""
        return False

    def _negative(self) -> dict[str, Any]:
        """The empty prompt's encoding (computed while the text encoder was loaded, else now, on CPU)."""
        if self.negative_text is None:
            device = self.device
            self.device = "cpu"
            try:
                self.load_encoders(only=(self.te,))
                self.encode_captions([""])
            finally:
                self.unload_encoders()
                self.device = device
        return self.negative_text  # type: ignore[return-value]

    def generate_batch(self, pipe: Any, *, prompt: str | Sequence[str] | None, seeds: Sequence[int], steps: int,
                       guidance: float, width: int, height: int, lora_scale: float,
                       text: dict[str, Any] | None = None) -> list:
        """One image per seed from one pipeline call: batched starting latents, one per seed. One prompt goes to
        the pipeline once with ``num_images_per_prompt`` = the seeds (the pipeline repeats its encoding, and the
        empty prompt's for CFG); per-seed prompts go as a list, one image each (the pipeline encodes as many empty
        prompts for CFG). Pre-encoded ``text`` has one row per seed (a batch of 1 is repeated), and so has the
        empty prompt's encoding passed with it for CFG. The text encoders pad to ``max_sequence_length``, so a
        row's encoding does not depend on the others."""
        dtype = getattr(pipe, "_lora_run_dtype", None) or self.compute_dtype
        device = pipe._execution_device
        kwargs: dict[str, Any] = {}
        if text is not None:
            kwargs["prompt_embeds"] = image_rows(text["prompt_embeds"].to(device, dtype), len(seeds))
            if self._guided(pipe, guidance):
                negative = self._negative()["prompt_embeds"].to(device, dtype)
                kwargs["negative_prompt_embeds"] = image_rows(negative, len(seeds), "negative prompt_embeds")
            per_prompt = 1
        else:
            kwargs["prompt"], per_prompt = pipeline_prompt(prompt, seeds)
        channels = pipe.transformer.config.in_channels       # patchified: 4 × the VAE's latent channels
        h, w = height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2)
        noise = seeded_noise(seeds, (channels, h, w))
        result = pipe(num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                      num_images_per_prompt=per_prompt, generator=seed_generators(seeds),
                      latents=noise.to(device, dtype), max_sequence_length=self.max_sequence_length,
                      text_encoder_out_layers=self.text_layers, attention_kwargs={"scale": float(lora_scale)},
                      output_type="pil", **kwargs)
        return list(result.images)


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 [klein] 4B/9B, base or distilled: Qwen3 text encoder, no guidance embedding."""

    variant = "klein"
    text_encoders = ("qwen3",)
    text_layers = (9, 18, 27)
    pipeline_names = ("Flux2KleinPipeline",)
    text_layout = layouts.QWEN3
    memory_shape = KLEIN_SHAPE
    text_fit = cf.QWEN3
    HUB_IDS = {"base-4b": "black-forest-labs/FLUX.2-klein-base-4B", "base-9b": "black-forest-labs/FLUX.2-klein-base-9B",
               "4b": "black-forest-labs/FLUX.2-klein-4B", "9b": "black-forest-labs/FLUX.2-klein-9B"}
    default_hub_id = HUB_IDS["base-4b"]

    def hub_id(self) -> str:
        return self.HUB_IDS[self.recipe.model.version or "base-4b"]

    def planning_shape(self) -> tuple[Any, str | None]:
        """[klein] 4B or 9B: the size the transformer's weights hold where their headers can be read, else the one
        `[model] version` or the hub id names; the 9B (the larger) where none says."""
        count = self.transformer_parameters()
        if count is not None:
            nearest = min((KLEIN_4B_SHAPE, KLEIN_9B_SHAPE), key=lambda s: abs(count / s.params - 1))
            return nearest, self.size_note(nearest, count)
        m = self.recipe.model
        version = m.version or next((v for v, hub in self.HUB_IDS.items() if hub == m.source), None)
        if version is not None:
            return (KLEIN_9B_SHAPE if "9b" in version else KLEIN_4B_SHAPE), None
        return KLEIN_9B_SHAPE, ("[model] source does not say whether it is [klein] 4B or 9B (no [model] version, "
                                "weights not readable here): these estimates are for the 9B, the larger; the run plans "
                                "for the model it loads")

    @property
    def is_distilled(self) -> bool:
        """The step-distilled [klein] (no CFG in its pipeline): ``[model] version`` "4b"/"9b", else the source's
        ``model_index.json`` (``is_distilled``)."""
        version = self.recipe.model.version
        if version:
            return not version.startswith("base-")
        index = self.source_json("", "model_index.json") or {}
        return bool(index.get("is_distilled", False))

    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        problems = super().check_sources()
        m = self.recipe.model
        if m.version and m.source and is_local_source(m.source):
            index = Path(m.source) / "model_index.json"
            distilled = (config_json(index) or {}).get("is_distilled")
            if distilled is not None and bool(distilled) == m.version.startswith("base-"):
                problems.append((("model", "version"), f"\"{m.version}\" names a {'base' if m.version.startswith('base-') else 'distilled'} "
                                 f"[klein], but {index} says is_distilled = {str(bool(distilled)).lower()}"))
        return problems

    def _encoder_classes(self) -> tuple[Any, Any]:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM, Qwen3Config

    def _encoder_call(self) -> tuple[Any, dict[str, Any]]:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._get_qwen3_prompt_embeds, {}

    def _pipeline(self, **parts: Any) -> Any:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline(**parts, is_distilled=self.is_distilled)

    def _guided(self, pipe: Any, guidance: float) -> bool:
        return guidance > 1 and not pipe.config.is_distilled


class Flux2DevAdapter(Flux2Adapter):
    """FLUX.2 [dev] (32 B): Mistral-3 text encoder, distilled guidance embedding."""

    variant = "dev"
    features = Flux2Adapter.features | {"guidance"}
    text_encoders = ("mistral",)
    text_layers = (10, 20, 30)
    text_width_field = "text_config.hidden_size"
    pipeline_names = ("Flux2Pipeline",)
    text_layout = layouts.MISTRAL3
    memory_shape = DEV_SHAPE
    text_fit = cf.MISTRAL3
    default_hub_id = "black-forest-labs/FLUX.2-dev"

    def __init__(self, recipe: Any, **kw: Any):
        super().__init__(recipe, **kw)
        self.guidance_embeds = True

    def _encoder_classes(self) -> tuple[Any, Any]:
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        return Mistral3ForConditionalGeneration, Mistral3Config

    def _tokenizer_class(self) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor

    def _encoder_call(self) -> tuple[Any, dict[str, Any]]:
        from diffusers import Flux2Pipeline
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        return Flux2Pipeline._get_mistral_3_small_prompt_embeds, {"system_message": SYSTEM_MESSAGE}

    def _pipeline(self, **parts: Any) -> Any:
        from diffusers import Flux2Pipeline

        return Flux2Pipeline(**parts)
