"""`ModelAdapter`: everything the native trainer needs to know about one model family.

The native backend is one training loop (``train.py``), one data pipeline (``data.py``), one cache
(``cache.py``), one checkpoint format and one generation API (``generate.py``) shared by every family.
What differs between FLUX.1-dev, Hunyuan-DiT and HunyuanImage-2.1 lives in a subclass of
:class:`ModelAdapter`, one per family, registered in ``lora_run_native/adapters/__init__.py``.

Contract (stable; other adapters code against it):

* **Class attributes** describe the family without importing torch: ``family``, ``pixel_multiple``
  (bucket sides are multiples of it: 16 for FLUX/Hunyuan-DiT, 32 for HunyuanImage-2.1), ``objective``
  (``"flow"``: ``x_t = (1-σ)·x0 + σ·ε``, target ``ε - x0``; ``"ddpm"``: DDPM, v- or ε-prediction as the model's
  scheduler config says),
  ``features`` (recipe features the adapter honours: ``lora_run_training.capabilities`` names; the ``native`` backend
  registers them as its capabilities for this family), ``reasons`` (why a feature is not honoured),
  ``target_presets`` (LoRA target preset → regular expressions over module names), ``lora_formats``,
  ``text_encoders`` (names of the text encoders, also the names used in ``[model.files]``),
  ``trainable_text_encoder`` (the encoder a text-encoder LoRA may wrap, or ``None``) and, optionally,
  ``config_fits`` / ``file_fits`` (what each component's config.json declares and where its weights hold it:
  compared from the headers before anything loads, ``lora_run_formats.config_fit``), ``file_layouts`` (the
  single-file layouts each ``[model.files]`` slot's loader converts, ``lora_run_formats.layouts``) and
  ``pipeline_names`` / ``transformer_class`` (what a diffusers folder of the family names: a folder another family
  claims is refused, ``foreign_folder``).
* **Lifecycle** (called by ``train.py`` in this order): ``check_sources()`` (no torch; by ``lora-run
  check``) → ``load_encoders()`` → ``encode_images()`` / ``encode_captions()`` for every cache miss →
  ``unload_encoders()`` → ``load_transformer()`` → ``prepare_transformer()`` (in ``train.py``, the one place
  the transformer is set up for training) → ``inject_lora()`` → per step ``sample_timesteps()``,
  ``noisy_and_target()``, ``predict()``, ``loss_weights()`` → ``lora_files()`` for every output format.
* **Inference**: ``load_pipeline()`` (the family's diffusers pipeline from ``recipe.model``),
  ``load_lora_into_pipeline()``, ``generate()`` (one image; LoRA strength applied through ``lora_scale``) and
  ``sampling_pipeline()`` (a pipeline around the transformer being trained, for samples during training).

Tensor conventions: images enter ``encode_images`` as ``(B, 3, H, W)`` floats in ``[-1, 1]``; latents
are the *normalised* latents the transformer sees, unpacked ``(B, C, h, w)``; caption encodings are a dict of
tensors with the batch first (``encode_captions`` returns a batch; the cache stores one sample per file
without the batch dimension and the loader stacks them again), padded to one shape per key, embeddings in
``compute_dtype`` and the masks named in ``text_masks`` int64 (``text_dtype``: what the cache stores and
requires on reading; latents are float32). ``text_shapes`` (optional) declares the shape of each such tensor
before any encoder loads (fixed sequence lengths, widths from the configs: ``encoder_width``); the cache rebuilds
entries of another shape even in a run that encodes nothing. ``t`` is the adapter's own timestep:
σ ∈ [0, 1] for flow models, an integer-valued tensor in ``[0, 1000)`` for DDPM models.

torch is never imported at module level: ``lora-run check`` and ``lora-run plugins`` import this file.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lora_run.files import shown
from lora_run_training import ModelSourceError

from lora_run_formats.config_fit import Blocks, Fit, Width, declared, header_shapes, held_width
from lora_run_formats.layouts import Layout, Link, layout_problem, link_problem
from lora_run_formats.lora_check import Targets, fit_problem, linear_shapes, structure_problem
from lora_run_formats.model_files import (component_fit_problems, component_headers, component_weights, config_json,
                                          file_fit_problems, folder_classes, folder_problems, parameter_count,
                                          read_weights)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lora_run.schema import Recipe

#: Features every native adapter honours (the shared loop implements them); adapters add their own.
COMMON_FEATURES: frozenset[str] = frozenset({
    "regularization", "regularization_weight", "caption_dropout", "lora_dropout", "lora_alpha", "lora_modules",
    "sampling", "save_every_epochs", "save_every_steps", "epochs", "steps", "multi_gpu",
    "targets:attention", "targets:attention+mlp", "targets:all-linear",
    "optimizer:adafactor", "optimizer:adamw", "optimizer:adamw8bit", "optimizer:prodigy",
    "scheduler:constant", "scheduler:constant_with_warmup", "scheduler:cosine", "scheduler:linear",
    "loss:*",  # every registered loss: the loop calls it as `loss(prediction, target, **info)`
})

#: Flow-matching features (timestep sampling choices, SD3 loss weighting, noise offset).
FLOW_FEATURES: frozenset[str] = frozenset({
    "noise_offset", "timestep_weighting",
    "timestep_sampling:uniform", "timestep_sampling:sigmoid", "timestep_sampling:logit-normal",
    "timestep_sampling:shift", "timestep_sampling:flux-shift",
})

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}

#: LoRA target presets for diffusers' MMDiT layout (double-stream `transformer_blocks`, single-stream
#: `single_transformer_blocks`), shared by FLUX.1 and HunyuanImage-2.1. `proj_out` is anchored to the single
#: blocks: a bare `proj_out` is also the model's output layer.
_MMDIT_DOUBLE_ATTN = [r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                      r"to_add_out)"]
_MMDIT_SINGLE_ATTN = [r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)"]
_MMDIT_MLP = [r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
              r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"]
_MMDIT_MODULATION = [r"transformer_blocks\.\d+\.(norm1|norm1_context)\.linear",
                     r"single_transformer_blocks\.\d+\.norm\.linear"]
MMDIT_TARGET_PRESETS: dict[str, list[str]] = {
    "attention": _MMDIT_DOUBLE_ATTN + _MMDIT_SINGLE_ATTN,
    "attention+mlp": _MMDIT_DOUBLE_ATTN + _MMDIT_SINGLE_ATTN + _MMDIT_MLP,
    "all-linear": _MMDIT_DOUBLE_ATTN + _MMDIT_SINGLE_ATTN + _MMDIT_MLP + _MMDIT_MODULATION,
}


def mmdit_fit(double: str, single: str, image_in: str, text_in: str, text_field: str) -> tuple[Blocks | Width, ...]:
    """What the config.json of an MMDiT transformer (FLUX.1, FLUX.2, HunyuanImage-2.1) declares and where its
    weights hold it (``lora_run_formats.config_fit``), in one layout: the double- and single-stream blocks (their
    names before the number: ``transformer_blocks`` in diffusers' layout, ``double_blocks`` in BFL's), the image
    input projection (rows: heads × head size, columns: ``in_channels``) and the text one (columns:
    ``text_field``). Names may carry a prefix (``model.diffusion_model.`` in ComfyUI's files)."""
    return (Blocks("num_layers", rf"(?:^|\.){double}\.(\d+)\.", "double block"),
            Blocks("num_single_layers", rf"(?:^|\.){single}\.(\d+)\.", "single block"),
            Width(("num_attention_heads", "attention_head_dim"), rf"(?:.*\.)?{image_in}", 0),
            Width(("in_channels",), rf"(?:.*\.)?{image_in}", 1),
            Width((text_field,), rf"(?:.*\.)?{text_in}", 1))


def transformer_targets(module: str) -> tuple[str, tuple[str, ...]] | None:
    """Where a LoRA module of diffusers' layout goes (``lora_run_formats.lora_check.Targets``):
    ``transformer.<layer>`` -> the transformer's layer; other names are not declared (left to the loader)."""
    component, _, layer = module.partition(".")
    return (component, (layer,)) if component == "transformer" and layer else None


def encoder_fits(size_gib: float, free_gib: float) -> bool:
    """Whether a frozen text encoder of ``size_gib`` is placed whole on a device with ``free_gib`` left: its
    weights plus a tenth of them (at least 1 GiB) for the activations of one caption and the allocator's
    slack. The budgets proven on the GPU keep their placement (T5-XXL whole in 12 GiB)."""
    return size_gib + max(1.0, 0.1 * size_gib) <= free_gib


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``(len(seeds), *shape)`` float32 standard normal noise on the CPU, row ``i`` from its own generator seeded
    with ``seeds[i]``: a seed draws the same row alone or in any batch (the starting latents of generation)."""
    import torch

    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(seed)))
                      for seed in seeds])


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed, for a pipeline that also draws noise while sampling (a list of generators:
    diffusers draws row ``i`` of each such noise from generator ``i``)."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def seed_prompts(prompt: str | Sequence[str] | None, seeds: Sequence[int]) -> list[str | None]:
    """One prompt per seed: ``prompt`` for every seed when it is one string (or None, with pre-encoded text), else
    the sequence, which must hold one prompt per seed."""
    if prompt is None or isinstance(prompt, str):
        return [prompt] * len(seeds)
    prompts = list(prompt)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds: give one prompt, or one per seed")
    return prompts


def pipeline_prompt(prompt: str | Sequence[str] | None, seeds: Sequence[int]) -> tuple[str | list[str] | None, int]:
    """``(prompt, num_images_per_prompt)`` for a diffusers pipeline making one image per seed: one prompt shared by
    every seed goes as that string with ``len(seeds)`` images (encoded once, as before prompts could differ);
    different prompts go as the list, one per seed, with 1 image each (the pipelines repeat a list's prompt
    encodings ``num_images_per_prompt`` times, and some of their masks then in another order)."""
    prompts = seed_prompts(prompt, seeds)
    if prompts and all(p == prompts[0] for p in prompts):
        return prompts[0], len(prompts)
    if any(not isinstance(p, str) for p in prompts):
        raise ValueError("per-seed prompts must all be strings")
    return prompts, 1


def text_rows(text: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Pre-encoded text (``encode_captions``' dict) with one row per image of ``count`` (``image_rows``)."""
    return {key: image_rows(value, count, key) for key, value in text.items()}


def image_rows(value: torch.Tensor, count: int, name: str = "prompt_embeds") -> torch.Tensor:
    """A text tensor with one row per image of ``count``: batch 1 repeated ``count`` times (contiguous, as
    stacked rows are), batch ``count`` as it is."""
    _check_rows(name, value, count)
    return value if value.shape[0] == count else value.expand(count, *value.shape[1:]).contiguous()


def text_row(text: dict[str, torch.Tensor], index: int, count: int) -> dict[str, torch.Tensor]:
    """The pre-encoded text of image ``index`` of ``count`` as a batch of 1: row ``index`` of a tensor with one row
    per image, a tensor of batch 1 as it is."""
    for key, value in text.items():
        _check_rows(key, value, count)
    return {key: value if value.shape[0] == 1 else value[index:index + 1] for key, value in text.items()}


def _check_rows(name: str, value: torch.Tensor, count: int) -> None:
    if value.shape[0] not in (1, count):
        raise ValueError(f"pre-encoded text {name!r} has {value.shape[0]} rows for {count} seeds: give 1 row, or "
                         "one per seed")


def matches_module(name: str, patterns: Sequence[str], compiled: Sequence[re.Pattern] | None = None) -> bool:
    """Whether a LoRA target pattern of `[lora] modules` / a preset selects the module ``name``: the name itself,
    a dotted suffix of it, or a regular expression matching the whole name (``lora_target_modules``' rule)."""
    compiled = compiled if compiled is not None else [re.compile(p) for p in patterns]
    return any(name == raw or name.endswith("." + raw) or pattern.fullmatch(name)
               for pattern, raw in zip(compiled, patterns))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when empty), at most 300 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def is_local_source(source: str) -> bool:
    """A `model.source` that names a folder (recipe paths are already absolute) rather than a hub id."""
    if source.startswith(("/", ".", "~")) or os.path.exists(source):   # False (no OSError) for over-long names
        return True
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is None


def hub_offline(recipe: Recipe) -> bool:
    """True when no download may be attempted: `[model] offline = true` or `HF_HUB_OFFLINE` set."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return recipe.model.offline or env not in ("", "0", "false", "no", "off")


#: Seconds `hub_unreachable` waits for the hub to answer (a hub that answers anything is reachable).
HUB_PROBE_TIMEOUT_S = 5.0
_HUB_PROBES: dict[str, str | None] = {}


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it answers (any HTTP status counts).

    One HEAD request, bounded to ``timeout`` seconds in all (name lookup included); the answer is kept for
    the process. Without it, a hub id and no network cost minutes of the hub client's retries."""
    import threading
    import urllib.error
    import urllib.request

    endpoint = hub_endpoint()
    if endpoint in _HUB_PROBES:
        return _HUB_PROBES[endpoint]
    result: list[str | None] = [f"no answer within {timeout:g} s"]

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"),
                                   timeout=timeout).close()
            result[0] = None
        except urllib.error.HTTPError:  # it answered: reachable (authorisation is the hub client's business)
            result[0] = None
        except urllib.error.URLError as exc:
            result[0] = str(getattr(exc, "reason", exc))
        except Exception as exc:  # noqa: BLE001 - timeouts, resets: unreachable, say why
            result[0] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    _HUB_PROBES[endpoint] = result[0]
    return result[0]


def unreachable_message(repo_id: str, reason: str) -> str:
    """What to do when a hub model is needed, not cached, and the hub cannot be reached."""
    return (f"hub model {repo_id!r} is not in the local Hugging Face cache and the hub ({hub_endpoint()}) cannot be "
            f"reached ({reason}). Download it first where there is network (`hf download {repo_id}`, then copy "
            "the cache or the folder here) and point [model] source at the local folder, or, with the model in "
            "the cache, set [model] offline = true")


def _library_loggers() -> list[Any]:
    """transformers' and diffusers' logging modules (each of the same shape), those importable."""
    out = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            out.append(importlib.import_module(name))
        except Exception:  # noqa: BLE001 - cosmetics only
            pass
    return out


def quiet_libraries() -> None:
    """No per-file loading/saving progress bars from transformers/diffusers (our own bar is enough)."""
    for log in _library_loggers():
        log.disable_progress_bar()
        log.set_verbosity_error()


@contextlib.contextmanager
def libraries_quieted() -> Iterator[None]:
    """`quiet_libraries` for a run's or a generation's length, and the libraries' own verbosity and progress bars
    given back after it (a process that goes on, the Python API's, keeps its transformers warnings)."""
    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in _library_loggers()]
    quiet_libraries()
    try:
        yield
    finally:
        for log, verbosity, bars in saved:
            log.set_verbosity(verbosity)
            (log.enable_progress_bar if bars else log.disable_progress_bar)()


_LORA_KEY = re.compile(r"^(?P<component>[A-Za-z_][\w]*)\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def require_lora_fit(components: dict[str, Any], tensors: dict[str, Any], path: Path, family: str) -> None:
    """Before a LoRA is loaded into ``components`` (prefix -> module: ``transformer``, ``text_encoder`` …) from
    ``tensors`` in diffusers/peft names (``<prefix>.<module>.lora_A.weight``): every ``lora_A``/``lora_B`` tensor must
    name a linear layer of that module with its width (``lora_A``: rank × inputs, ``lora_B``: outputs × rank).
    diffusers only warns (unseen) about tensors that match no layer, and widens a layer to fit a wider ``lora_A``
    (its support of FLUX control LoRAs), so a LoRA of another model size or family was evaluated as if it applied,
    or crashed at the first image after the pipeline loaded. OutputError (exit 2) names the file and a tensor."""
    from lora_run.errors import OutputError

    bad: list[str] = []
    for key, value in sorted(tensors.items()):
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        layer = _layer(components.get(m["component"]), m["module"])
        if not (isinstance(getattr(layer, "in_features", None), int)
                and isinstance(getattr(layer, "out_features", None), int)):
            bad.append(f"{key} names no linear layer of the {family} model")
            continue
        size, dim = (layer.in_features, 1) if m["which"] == "A" else (layer.out_features, 0)
        if len(value.shape) != 2 or value.shape[dim] != size:
            bad.append(f"{key} has shape {tuple(value.shape)}; the layer has {size} "
                       f"{'inputs' if m['which'] == 'A' else 'outputs'}")
    if bad:
        raise OutputError(f"{shown(path)}: does not fit this {family} model ({len(bad)} of its tensors; {bad[0]}"
                          f"{' …' if len(bad) > 1 else ''}): a LoRA of another model or model size?")


def _layer(component: Any, name: str) -> Any:
    """The submodule ``name`` of ``component``, or None; a text encoder's ``text_model.`` names are looked up without
    it too (transformers 5 dropped that level of CLIP; diffusers maps a LoRA's keys to either)."""
    for candidate in (name, name[len("text_model."):] if name.startswith("text_model.") else None):
        try:
            if candidate and hasattr(component, "get_submodule"):
                return component.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def weights_misfit(info: dict[str, Any], diffusers: bool) -> str | None:
    """What a ``from_pretrained(..., output_loading_info=True)`` report says does not fit, or None: weights the model
    lacks in its file (diffusers and transformers would initialise them randomly, with a warning nobody sees) or,
    for a diffusers model, tensors of the file the model has no place for (dropped: a config.json describing fewer
    blocks than the weights trains a smaller model). A transformers text encoder may hold heads it does not use."""
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or []) if diffusers else []
    if missing:
        return f"{len(missing)} weight(s) missing from its files ({', '.join(map(str, missing[:3]))}…)"
    if unexpected:
        return f"{len(unexpected)} tensor(s) of its files have no place in the model ({', '.join(map(str, unexpected[:3]))}…)"
    return None


def file_identity(path: Path) -> str:
    """Cheap identity of a (possibly many-GB) weight file: path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def folder_identity(folder: Path, subfolder: str) -> str:
    """Identity of a diffusers component folder: config content + weight file identities."""
    digest = hashlib.sha256()
    root = folder / subfolder
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if p.is_file():
            if p.suffix in (".json", ".txt", ".model"):
                digest.update(p.name.encode() + b"\0" + p.read_bytes())
            else:
                digest.update(file_identity(p).encode())
    return digest.hexdigest()[:16]


class ModelAdapter:
    """Base class of a model family adapter. Subclasses override the methods that raise NotImplementedError.

    An instance is created per run with the resolved recipe, the torch device and the backend options
    (``NativeOptions``); it holds the loaded encoders/VAE between ``load_encoders`` and
    ``unload_encoders``.
    """

    family: ClassVar[str] = ""
    pixel_multiple: ClassVar[int] = 16
    objective: ClassVar[str] = "flow"            # "flow" | "ddpm"
    #: consecutive latent channels holding one VAE latent channel (the noise offset draws one δ for them): 1 for
    #: an unpatchified latent, 4 where the trained latent is 2×2-patchified (FLUX.2)
    noise_offset_group: ClassVar[int] = 1
    features: ClassVar[frozenset[str]] = COMMON_FEATURES
    reasons: ClassVar[dict[str, str]] = {}
    target_presets: ClassVar[dict[str, list[str]]] = {}
    lora_formats: ClassVar[tuple[str, ...]] = ("diffusers",)
    #: Why an output format is not written for this family (shown by `lora-run plan`).
    format_notes: ClassVar[dict[str, str]] = {}
    text_encoders: ClassVar[tuple[str, ...]] = ()
    #: Keys of ``encode_captions``' dict that are attention masks (int64); every other key is an embedding.
    text_masks: ClassVar[frozenset[str]] = frozenset()
    trainable_text_encoder: ClassVar[str | None] = None
    default_hub_id: ClassVar[str | None] = None
    #: `[model.files]` keys this family uses (others are refused by `check_sources`).
    file_keys: ClassVar[tuple[str, ...]] = ("transformer", "vae")
    #: component -> its folder in a diffusers model folder (``transformer`` -> ``transformer`` …).
    SUBFOLDER: ClassVar[dict[str, str]] = {}
    #: component folder -> what its config.json declares and where its weights hold it
    #: (``lora_run_formats.config_fit``): compared by `check_sources` and before a component loads, so no library
    #: builds a model its weights do not fill (a config.json of `num_layers = 100000` took minutes and gigabytes).
    config_fits: ClassVar[dict[str, Fit]] = {}
    #: `[model.files]` slot -> the same in the file's own layout, compared with the config.json the loader reads
    #: for it from the source (``SUBFOLDER``).
    file_fits: ClassVar[dict[str, Fit]] = {}
    #: `[model.files]` slot -> the layouts its single-file loader converts (``lora_run_formats.layouts``): a file of
    #: none of them (another component's, another family's, a LoRA) is named by `check_sources` with what it is
    file_layouts: ClassVar[dict[str, tuple[Layout, ...]]] = {}
    #: the widths a `[model.files]` slot's file shares with the transformer file (``lora_run_formats.layouts.Link``):
    #: a file of another model size (CLIP-G for CLIP-L, T5-XXL for ByT5) is named by `check_sources`
    file_links: ClassVar[tuple[Link, ...]] = ()
    #: what a diffusers folder of this family says it is: the pipelines (``model_index.json``'s ``_class_name``)
    #: whose folders it loads, and its transformer's class (default: ``COMPONENTS``'); a folder another installed
    #: family claims, and this one does not, is named by `check_sources` (``foreign_folder``)
    pipeline_names: ClassVar[tuple[str, ...]] = ()
    transformer_class: ClassVar[str | None] = None
    #: where the module names of the family's LoRA files go (``lora_run_formats.lora_check.Targets``: a module name
    #: as in the file -> the component and the layers, in diffusers' names, it writes), for ``lora_problem``;
    #: default: diffusers' ``transformer.<layer>`` names
    lora_targets: ClassVar[Targets] = staticmethod(transformer_targets)
    #: the memory model's shape of the family's transformer (``lora_run_native.shapes.FamilyShape``; None: no
    #: estimates): what `lora-run plan` estimates with, rescaled at run time to the model actually loaded
    memory_shape: ClassVar[Any] = None

    def __init__(self, recipe: Recipe, *, device: Any = "cpu", options: Any = None, shown: str = "recipe.toml"):
        self.recipe = recipe
        self.device = device
        self.options = options
        self.shown = shown                       # recipe file name for error messages
        self.encoders: dict[str, Any] = {}       # loaded text encoders / tokenizers / vae
        self.sample_vae: Any = None              # VAE kept (on CPU) for in-training samples

    # ------------------------------------------------------------------------------------ precision
    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype the frozen modules compute in: bf16/fp16 with mixed precision, fp32 with `no`."""
        import torch

        return getattr(torch, DTYPES[self.recipe.train.mixed_precision])

    # --------------------------------------------------------------------------------- model sources
    def error(self, key: str, message: str) -> ModelSourceError:
        """A ModelSourceError naming the recipe file and key: `recipe.toml: [model.files.vae] …`."""
        return ModelSourceError(f"{self.shown}: [{key}] {message}")

    def damaged_weights(self, key: str, module: Any) -> ModelSourceError | None:
        """When ``key``'s frozen weights (``transformer``, ``vae`` or a text encoder) hold NaN or inf, a
        ModelSourceError naming where they come from (every output of such a model is NaN: the file is damaged, and
        no learning rate helps); else None. It reads every weight, so it is asked only after a non-finite result."""
        import torch

        bad = None
        try:
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if "lora_" in name or tensor.requires_grad or not tensor.is_floating_point() or tensor.is_meta:
                    continue
                if not bool(torch.isfinite(tensor.detach().float()).all()):
                    bad = name
                    break
        except Exception:  # noqa: BLE001 - a module this cannot read (sharded, offloaded): no verdict
            return None
        if bad is None:
            return None
        value = self.recipe.model.files.get(key)
        if value:
            return self.error(f"model.files.{key}", f"{shown(Path(value).name)}: its weights hold NaN or inf ({bad}): "
                              "the file is damaged; download it again")
        return self.error("model.source", f"{shown(self.recipe.model.source or '')}: the {key} weights hold NaN or inf "
                          f"({bad}): its files are damaged; download them again")

    def nonfinite_encoding(self, key: str, what: str) -> Exception:
        """The error for an encoder (``vae`` or a text encoder) whose output for ``what`` holds NaN or inf: its
        damaged weights named (``damaged_weights``), else an overflow in the run's precision (never cached)."""
        from lora_run.errors import BackendError

        return self.damaged_weights(key, self.encoders.get(key)) or BackendError(
            f"the {key} encoded {what} to NaN or inf values although its weights are finite: an overflow in "
            f"{self.compute_dtype} ([train.mixed_precision] is \"{self.recipe.train.mixed_precision}\"; use bf16)")

    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        """Problems with `[model]` found without loading anything (missing files, not safetensors,
        hub id not cached while offline). No torch. Default: files exist and are safetensors."""
        problems: list[tuple[tuple[str, ...], str]] = []
        m = self.recipe.model
        files: dict[str, Path] = {}              # the [model.files] that are complete safetensors files
        for key in self.file_keys:               # others are refused by core from the family's registered slots
            value = m.files.get(key)
            if value is None:
                continue
            p = Path(value)
            if not os.path.lexists(p):
                problems.append((("model", "files", key), f"file not found: {p}"))
            elif p.suffix != ".safetensors":
                problems.append((("model", "files", key), f"{p.name}: only .safetensors files are loaded"))
            elif (read := read_weights(p))[1] is not None:
                problems.append((("model", "files", key), f"{shown(p)}: {read[1]}"))
            else:
                files[key] = p
        wrong = dict(self.single_file_problems(files))       # another kind of file, or of another model size
        problems += list(wrong.items())
        files = {k: p for k, p in files.items() if ("model", "files", k) not in wrong}
        root: Path | None = None                 # the source folder, or the hub model's snapshot in the cache
        if m.source is not None:
            if not m.source.strip():
                problems.append((("model", "source"), "is empty: give a hub id (owner/name) or a local diffusers "
                                 "folder"))
            elif is_local_source(m.source):
                if not os.path.isdir(m.source):
                    problems.append((("model", "source"), f"folder not found: {m.source}"))
                else:
                    root = Path(m.source)
                    slots = {k for k in self.file_keys if m.files.get(k) is not None}    # not read from the folder
                    loaded = frozenset(s for k, s in self.SUBFOLDER.items() if k not in slots) - {
                        s for k, s in self.SUBFOLDER.items() if k in slots}
                    problems += self.source_folder_problems(root, shown(root), loaded=loaded)
            elif (snapshot := self.hub_snapshot(m.source)) is not None:
                root = snapshot
                problems += self.source_folder_problems(snapshot, f"{m.source} (its copy in the local Hugging Face "
                                                        "cache)", partial=True)
            elif hub_offline(self.recipe) and not self.hub_cached(m.source):
                problems.append((("model", "source"), f"hub model {m.source!r} is not in the local Hugging Face "
                                 "cache and downloads are off ([model] offline = true or HF_HUB_OFFLINE); "
                                 "download it first or point `source` at a local diffusers folder"))
            elif not hub_offline(self.recipe) and not self.hub_cached(m.source):
                reason = hub_unreachable()
                if reason:
                    problems.append((("model", "source"), unreachable_message(m.source, reason)))
        for key, path in files.items():          # a file's config comes from the source where it has one
            fit, sub = self.file_fits.get(key), self.SUBFOLDER.get(key)
            if root is not None and fit and sub:
                problems += [(("model", "files", key), why)
                             for why in file_fit_problems(root / sub / "config.json", path, fit)]
        return problems

    @classmethod
    def single_file_problems(cls, files: dict[str, Path]) -> list[tuple[tuple[str, ...], str]]:
        """What the ``[model.files]`` files (slot -> path) are where their slots do not take them: a file of none of
        the slot's ``file_layouts`` (another component's, another family's, a LoRA), then one of a width the
        transformer file does not take (``file_links``: CLIP-G as CLIP-L), each named with what it is. A file that
        is not a complete safetensors file is left to the caller, which names it in its own words. The one check of
        the single files' kinds: the native backend's ``check_sources`` and the engine backends' model checks
        (``lora_run_engines.model_file_problems``) call it, so every backend refuses the same files alike."""
        out: list[tuple[tuple[str, ...], str]] = []
        shapes: dict[str, dict[str, Any]] = {}
        for key, path in files.items():
            header = read_weights(path)[0]
            if header is None:
                continue
            why = layout_problem(header, cls.file_layouts.get(key, ()))
            if why is not None:
                out.append((("model", "files", key), f"{shown(path)} {why}"))
            else:
                shapes[key] = header_shapes(header)
        for link in cls.file_links if "transformer" in shapes else ():
            if link.slot in shapes and (why := link_problem(link, shapes[link.slot], shapes["transformer"],
                                                             files["transformer"])) is not None:
                out.append((("model", "files", link.slot), f"{shown(files[link.slot])} {why}"))
        return out

    def source_folder_problems(self, folder: Path, shown_as: str, **kw: Any) -> list[tuple[tuple[str, ...], str]]:
        """The source folder's problems at ``[model.source]``: another family's model (``foreign_folder``, first; its
        configs are then not compared with this family's ``config_fits``), then its files' (``folder_problems``).
        diffusion-pipe's model check calls it too, for the folder it loads FLUX.1's components from."""
        foreign = self.foreign_folder(folder, shown_as)
        found = folder_problems(folder, fits=None if foreign else self.config_fits, **kw)
        return [(("model", "source"), why) for why in ([foreign] if foreign else []) + found]

    def foreign_folder(self, folder: Path, shown_as: str) -> str | None:
        """Why the diffusers folder ``folder`` (``shown_as`` in the message) is another family's model, or None: the
        pipeline its ``model_index.json`` names, else its transformer's class, is claimed by other installed
        families (``pipeline_names``, ``transformer_class``) and not by this one. A folder no family claims (a
        pipeline of this family's transformer lora-run does not list, a folder of components without
        ``model_index.json``) is left to the loaders."""
        from . import registered_adapters

        pipeline, transformer = folder_classes(folder)
        adapters = registered_adapters()
        evidence = ((f"its model_index.json names {pipeline}", pipeline, lambda a: pipeline in a.pipeline_names),
                    (f"its transformer is a {transformer}", transformer, lambda a: transformer == a.transformer_name()))
        for says, name, claimed in evidence:
            owners = sorted(family for family, adapter in adapters.items() if name and claimed(adapter))
            if owners and self.family not in owners:
                return (f"{shown_as} is a {' or '.join(owners)} model ({says}), not a {self.family} one: set [model] "
                        f"family = \"{owners[0]}\", or [model] source to a {self.family} folder or hub id")
        return None

    @classmethod
    def transformer_name(cls) -> str | None:
        """The class of this family's transformer (``transformer_class``, else ``COMPONENTS``')."""
        return cls.transformer_class or (cls.COMPONENTS.get("transformer") or (None, None))[1]

    def cache_hint(self) -> str:
        """Why a hub file may be missing: downloads are off, or the hub cannot be reached."""
        if self.hub_down:
            return (f" (the Hugging Face hub {hub_endpoint()} cannot be reached: {self.hub_down}; the files are not "
                    "in the local cache: download them first, or point [model] source at a local folder)")
        if hub_offline(self.recipe) and not is_local_source(self.recipe.model.source or ""):
            return (" (downloads are off: [model] offline = true or HF_HUB_OFFLINE; the model is not in the local "
                    "cache)")
        return ""

    def hub_cached(self, repo_id: str) -> bool:
        """Whether the hub model's `model_index.json` is in the local cache (no network)."""
        return self.hub_snapshot(repo_id) is not None

    def hub_snapshot(self, repo_id: str) -> Path | None:
        """The local cache's folder of the hub model (the one holding its `model_index.json`), or None."""
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
            return None
        found = try_to_load_from_cache(repo_id, "model_index.json", revision=self.recipe.model.revision)
        return Path(found).parent if isinstance(found, str) else None

    #: Why the hub cannot be reached when a load found it so (None: reachable, offline, or not asked yet).
    hub_down: str | None = None

    def source_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` keyword arguments for `model.source` (offline, revision).

        When downloads are allowed but the hub cannot be reached (probed once, in seconds), loads use the local
        cache only; a hub `source` that is not cached fails at once (ModelSourceError), instead of after minutes
        of the hub client's retries."""
        kw: dict[str, Any] = {}
        src = self.recipe.model.source
        if hub_offline(self.recipe):
            kw["local_files_only"] = True
        elif src is None or not is_local_source(src):
            reason = hub_unreachable()
            if reason:
                if src is not None and not self.hub_cached(src):
                    raise self.error("model.source", unreachable_message(src, reason))
                if self.hub_down is None:
                    import sys

                    print(f"warning: the Hugging Face hub ({hub_endpoint()}) cannot be reached ({reason}); "
                          "loading from the local cache only ([model] offline = true skips this probe)",
                          file=sys.stderr)
                self.hub_down = reason
                kw["local_files_only"] = True
        if self.recipe.model.revision and not is_local_source(self.recipe.model.source or ""):
            kw["revision"] = self.recipe.model.revision
        return kw

    def source_identity(self, subfolder: str, file_key: str | None = None) -> str:
        """Identity string of one component: a single file, a local folder's component or a hub id. A single file
        takes its config from the source where that has one (the VAE's scaling and shift factors, FLUX.2's batch-norm
        eps, a text encoder's settings): that config's content is part of the file's identity, as a folder's JSON
        files are part of its own (read from the local cache only for a hub source: no download)."""
        m = self.recipe.model
        if file_key and m.files.get(file_key):
            identity = "file:" + file_identity(Path(m.files.get(file_key)))
            config = self.source_json(subfolder, download=False)
            if config is not None:
                text = json.dumps(config, sort_keys=True, separators=(",", ":"))
                identity += "|config:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
            return identity
        src = m.source or self.default_hub_id or "?"
        if is_local_source(src):
            return f"folder:{Path(src).resolve()}/{subfolder}:{folder_identity(Path(src), subfolder)}"
        return f"hub:{src}@{m.revision or 'main'}/{subfolder}"

    def transformer_parameters(self) -> int | None:
        """The parameters of the transformer the run will load, from its weights' safetensors headers (no torch, only
        headers read): `[model.files] transformer`, else the source folder's transformer component (a local folder or
        a hub model in the local cache); None where they cannot all be read here."""
        m = self.recipe.model
        if m.files.get("transformer"):
            return parameter_count([Path(m.files["transformer"])])
        src, sub = self._source(), self.SUBFOLDER.get("transformer")
        root = None if not src or not sub else Path(src) if is_local_source(src) else self.hub_snapshot(src)
        paths = component_weights(root / sub) if root is not None else None
        return parameter_count(paths) if paths else None

    def planning_shape(self) -> tuple[Any, str | None]:
        """The shape `lora-run plan` estimates with (before anything loads), and why its estimates do not stand for
        the run where they do not (``size_note``). Default: ``memory_shape``."""
        return self.memory_shape, self.size_note(self.memory_shape, self.transformer_parameters())

    def size_note(self, shape: Any, count: int | None) -> str | None:
        """None where the transformer's weights (``count`` parameters; None: not read) may be the model ``shape``
        describes (half to twice its parameters), else why the plan's estimates are for another model than the
        run's (a tiny test model, a pruned variant): the run plans for the model it loads."""
        if shape is None or count is None or 0.5 <= count / shape.params <= 2:
            return None
        def size(n: float) -> str:
            return f"{n / 1e9:.3g} B" if n >= 1e8 else f"{n / 1e6:.3g} M" if n >= 1e5 else f"{int(n):,}"

        return (f"the transformer's weights hold {size(count)} parameters, not the {size(shape.params)} of the "
                f"full-size {self.family} these estimates are for; the run plans for the model it loads")

    # ------------------------------------------------------------------------------------- loading
    def _source(self) -> str | None:
        """The diffusers folder or hub id components are loaded from (None: single files only)."""
        return self.recipe.model.source or None

    def source_error(self, key: str, what: str, exc: Exception) -> Exception:
        """One clear ModelSourceError for a hub or file error while loading ``what``."""
        if isinstance(exc, ModelSourceError):
            return exc
        return self.error(key, f"cannot load {what}{self.cache_hint()}: {first_line(exc)}")

    def load_from_source(self, cls: Any, subfolder: str, what: str, *, missing: tuple[str, str], **kw: Any) -> Any:
        """``cls.from_pretrained`` from the source's ``subfolder``; ``missing`` is the (key, message) when
        there is no source at all; errors name ``[model.source]``."""
        quiet_libraries()
        src = self._source()
        if src is None:
            raise self.error(*missing)
        if is_local_source(src) and not os.path.isdir(Path(src) / subfolder):
            raise self.error("model.source", f"{src} has no {subfolder}/ folder ({what})")
        import torch

        model = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
        fit = self.config_fits.get(subfolder)
        if model and fit and is_local_source(src) and (misfit := component_fit_problems(Path(src) / subfolder, fit)):
            raise self.error("model.source", f"{misfit[0]} ({what}; nothing was loaded)")
        try:
            loaded = cls.from_pretrained(src, subfolder=subfolder, **self.source_kwargs(), **kw,
                                         **({"output_loading_info": True} if model else {}))
        except Exception as exc:  # noqa: BLE001 - hub/file errors become one clear message
            raise self.source_error("model.source", f"{src}/{subfolder}", exc) from None
        if not model:
            return loaded
        from diffusers import ModelMixin

        module, info = loaded
        why = weights_misfit(info, diffusers=isinstance(module, ModelMixin))
        if why:
            raise self.error("model.source", f"{src}/{subfolder}: its weights do not fit its config.json ({what}): "
                             f"{why}")
        return module

    #: component -> (module, class name, keyword that takes the dtype, further keywords): how ``_component``
    #: loads ``transformer``, ``vae`` and each of ``text_encoders`` from the source's subfolder.
    COMPONENTS: ClassVar[dict[str, tuple[str, str, str, dict[str, Any]]]] = {}
    vae_scale_factor: int = 8

    def _load_tokenizers(self) -> None:
        """Load the tokenizers of ``text_encoders`` into ``self.tokenizers``."""
        raise NotImplementedError

    def _load_file(self, key: str, dtype: Any) -> Any:
        """The component of ``[model.files] <key>`` (families with single-file slots)."""
        raise NotImplementedError

    def _from_subfolder(self, cls: Any, key: str, **kw: Any) -> Any:
        """``cls.from_pretrained`` of component ``key`` from the source's subfolder."""
        raise NotImplementedError

    def file_component(self, key: str, dtype: Any) -> Any:
        """``_load_file``, with any failure of the family's conversion or config inference on the file's tensors
        (a tensor of another shape than its layout has: ``ValueError: not enough values to unpack``, a
        ``KeyError``, a size mismatch) named as the file that does not fit, exit 2, instead of a crash."""
        from lora_run.errors import LoraRunError

        try:
            return self._load_file(key, dtype)
        except (LoraRunError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - the file's tensors are what the family's code could not use
            name = Path(self.recipe.model.files.get(key)).name
            raise self.error(f"model.files.{key}", f"{shown(name)} does not fit the {self.family} {key} layout "
                             f"({type(exc).__name__}: {first_line(exc)})") from exc

    def _component(self, key: str, dtype: Any) -> Any:
        """One component in ``dtype``: from its ``[model.files]`` slot when the recipe names one, else from the
        source (``COMPONENTS``)."""
        if self.recipe.model.files.get(key) is not None:
            return self.file_component(key, dtype)
        import importlib

        module, name, dtype_keyword, extra = self.COMPONENTS[key]
        return self._from_subfolder(getattr(importlib.import_module(module), name), key, **{dtype_keyword: dtype},
                                    **extra)

    def frozen(self, module: Any) -> Any:
        module.requires_grad_(False)
        module.eval()
        return module

    def vae_factor(self, vae: Any) -> int:
        """Pixels per latent side of the loaded VAE (default: the class's ``vae_scale_factor``)."""
        return self.vae_scale_factor

    def load_encoders(self, only: tuple[str, ...] | None = None) -> None:
        """Load tokenizers, text encoders and the VAE (frozen, eval mode) onto ``self.device``; ``only`` limits
        it to some of them (``"vae"`` and names from ``text_encoders``). Already loaded ones are kept."""
        self._load_tokenizers()
        for key in ("vae", *self.text_encoders):
            if key in self.encoders or (only is not None and key not in only):
                continue
            module = self._component(key, self.compute_dtype)
            # a frozen text encoder too big for the memory this run may use is streamed; the VAE and an
            # encoder a LoRA trains are always placed whole
            whole = key == "vae" or key == self.trainable_text_encoder
            self.encoders[key] = self.frozen(module.to(self.device) if whole else self.place_encoder(module))
        if "vae" in self.encoders:
            self.vae_scale_factor = self.vae_factor(self.encoders["vae"])

    #: whether the last text encoder ``place_encoder`` placed is streamed from host memory
    offloaded: bool = False

    def place_encoder(self, module: Any) -> Any:
        """A frozen text encoder on the device: whole when it fits the memory this run may use
        (``encoder_fits``), else streamed layer by layer from host memory (diffusers' group offloading, the
        next layer prefetched on a side stream). So caching fits every budget training fits: T5-XXL (8.9 GiB
        in bf16) on an 8 GiB card, HunyuanImage's Qwen2.5-VL-7B (15.4 GiB) on a 16 GiB card, FLUX.2 [dev]'s
        Mistral-3 (45 GiB) on a 24 GiB card. ``offloaded`` says which."""
        import torch

        device = torch.device(self.device)
        self.offloaded = False
        if device.type != "cuda":
            return module.to(device)
        from ..train import gpu_budget_gib

        free, _ = gpu_budget_gib(self.recipe, device)
        size = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30
        return module.to(device) if encoder_fits(size, free) else self.stream_encoder(module, device)

    def stream_encoder(self, module: Any, device: Any) -> Any:
        """``module`` kept in host memory, each leaf layer moved to ``device`` just before it runs (on CUDA the
        next one prefetched on a side stream)."""
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(module, onload_device=device, offload_type="leaf_level",
                               use_stream=device.type == "cuda")
        self.offloaded = True
        return module

    def load_transformer(self) -> torch.nn.Module:
        """Load the denoiser (frozen, on CPU, in its storage dtype); ``prepare_transformer`` places it."""
        raise NotImplementedError

    #: Cache-identity prefix of the family (``encoder_identity``).
    cache_tag: ClassVar[str] = ""
    #: ``[model.files]`` slot that may hold the VAE (None: folders only).
    vae_file_key: ClassVar[str | None] = "vae"
    #: (label, subfolder, ``[model.files]`` slot or None) of each text encoder, in ``text_encoders`` order.
    encoder_sources: ClassVar[tuple[tuple[str, str, str | None], ...]] = ()

    def text_settings(self) -> str:
        """The tokenizer/prompt settings that change caption encodings (part of the text cache identity)."""
        return ""

    def encoder_identity(self, part: str) -> str:
        """Stable identity of the encoders behind a cache entry: ``part`` is ``"latents"`` (the VAE) or
        ``"text"`` (all text encoders + tokenizer settings). Includes the compute dtype."""
        dtype = self.recipe.train.mixed_precision
        if part == "latents":
            return f"{self.cache_tag}|vae|{self.source_identity('vae', self.vae_file_key)}|{dtype}"
        encoders = "|".join(f"{label}:{self.source_identity(sub, key)}" for label, sub, key in self.encoder_sources)
        return (f"{self.cache_tag}|{encoders}|tok:{self.source_identity('tokenizer')}|"
                f"{self.source_identity('tokenizer_2')}|{self.text_settings()}|{dtype}")

    def unload_encoders(self, keep: tuple[str, ...] = ()) -> None:
        """Free the text encoders and the VAE (GPU memory released) except the names in ``keep``.
        When sampling is on, the VAE moves to CPU as ``self.sample_vae`` instead of being freed."""
        import gc

        import torch

        for name in list(self.encoders):
            if name in keep:
                continue
            module = self.encoders.pop(name)
            if name == "vae" and self.recipe.sample.every_steps:
                self.sample_vae = module.to("cpu")
            del module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------ encoding
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B,3,H,W)`` in [-1,1] → normalised latents ``(B,C,h,w)`` (float32, deterministic: the mean
        of the latent distribution)."""
        raise NotImplementedError

    def encode_captions(self, captions: list[str], encoders: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Captions → dict of batched tensors. ``encoders`` limits which text encoders run (``None``: all);
        with text-encoder training the trainable one is run live, the others come from the cache."""
        raise NotImplementedError

    def text_keys(self, encoder: str) -> tuple[str, ...]:
        """The keys of ``encode_captions``' dict produced by ``encoder``."""
        raise NotImplementedError

    def text_shapes(self, encoder: str) -> dict[str, tuple[int | None, ...]] | None:
        """The shape of each tensor ``encoder`` gives one caption (its ``text_keys``, without the batch dimension), as
        a fresh encode gives it, known before any encoder loads: the family's fixed sequence lengths and the widths
        its configs declare (``encoder_width``); None for a dimension not known ahead. The text cache rebuilds an
        entry of another shape even in a run that encodes nothing to compare it with, and a fresh encode of another
        shape is the adapter's error. Default None: not known (the cache then compares its entries with the run's
        fresh encodes, else with each other)."""
        return None

    def source_json(self, subfolder: str, name: str = "config.json", *, download: bool = True) -> dict | None:
        """``<subfolder>/<name>`` (a config, ``model_index.json`` with ``subfolder=""``) of the source as a JSON object,
        or None where there is none to read (unreadable: treated as absent, `check` names it): a local folder's, or a
        hub model's, fetched as ``source_kwargs`` allow (offline: the local Hugging Face cache only); ``download=False``
        never fetches, whatever the recipe allows (a check before anything loads)."""
        src = self._source()
        if not src:
            return None
        if is_local_source(src):
            return config_json(Path(src) / subfolder / name)
        try:
            if download:
                from huggingface_hub import hf_hub_download

                kw = self.source_kwargs()
                found = hf_hub_download(src, name, subfolder=subfolder or None, revision=kw.get("revision"),
                                        local_files_only=kw.get("local_files_only", False))
            else:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(src, f"{subfolder}/{name}" if subfolder else name,
                                               revision=self.recipe.model.revision)
        except Exception:  # noqa: BLE001 - callers fall back (an inferred config) or say what is missing
            return None
        return config_json(found) if isinstance(found, str) else None

    def encoder_width(self, encoder: str, field: str) -> int | None:
        """A width of text encoder ``encoder`` (``field`` of its config: ``hidden_size``, ``d_model`` …), read
        without loading it: from the config.json its loader takes (the source's ``SUBFOLDER`` one) or, for a
        ``[model.files]`` file whose source has none, from the file's safetensors header through the family's
        ``file_fits`` rule for ``field``; None where neither says."""
        sub = self.SUBFOLDER.get(encoder)
        config = self.source_json(sub, download=False) if sub else None
        if config is not None:
            value = declared(config, field)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
        path, fit = self.recipe.model.files.get(encoder), self.file_fits.get(encoder)
        header = read_weights(path)[0] if path and fit else None
        return held_width(header_shapes(header), fit, field) if header is not None else None

    def text_dtype(self, key: str) -> torch.dtype:
        """The dtype of ``encode_captions``' tensor ``key``, as the text cache stores and requires it: int64 for a
        mask (``text_masks``), else ``compute_dtype`` (the text encoders run in it)."""
        import torch

        return torch.int64 if key in self.text_masks else self.compute_dtype

    # ---------------------------------------------------------------------------------------- LoRA
    def lora_problem(self, path: str | Path) -> str | None:
        """Why the LoRA file ``path`` cannot be applied to this recipe's model, from headers alone (no torch, nothing
        loaded; the words follow the file's name), or None: its matrices do not form LoRAs
        (``lora_check.structure_problem``), or a module does not fit the layer it names (``lora_check.fit_problem``:
        transposed matrices, a LoRA of another model size), compared where the component's weights are on disk
        (``lora_layer_shapes``). `lora-run eval` asks before anything loads, ``generate_images`` before it builds
        the pipeline. A file that is not a complete safetensors file is left to the caller's check."""
        header = read_weights(path)[0]
        if header is None:
            return None
        why = structure_problem(header)
        if why is not None:
            return f"not a LoRA file: {why}"
        why = fit_problem(header, self.lora_targets, self.lora_layer_shapes())
        return None if why is None else f"does not fit the {self.family} model of {self.model_shown()}: {why}"

    def model_shown(self) -> str:
        """The recipe's model in messages: ``[model.files.transformer] <file>`` where the transformer is a single
        file, else ``[model.source] <folder or hub id>``."""
        file = self.recipe.model.files.get("transformer")
        if file:
            return f"[model.files.transformer] {shown(file)}"
        return f"[model.source] {shown(self.recipe.model.source or self.default_hub_id or '?')}"

    def lora_layer_shapes(self) -> dict[str, dict[str, list[int] | None]]:
        """component (the pipeline's name: ``transformer``, ``text_encoder`` …) -> its layers' weight shapes
        (``lora_check.linear_shapes``), for the components loaded from the source folder (local, or a hub model in
        the local cache: nothing is downloaded) whose weights' headers can all be read, and for a ``[model.files]``
        file, where the family reads them from its header (``file_layer_shapes``)."""
        src = self._source()
        root = None if not src else Path(src) if is_local_source(src) else self.hub_snapshot(src)
        out = {}
        for key, value in sorted(self.recipe.model.files.items()):
            header = read_weights(value)[0] if key in self.file_keys and key in self.SUBFOLDER else None
            shapes = self.file_layer_shapes(key, header) if header is not None else None
            if shapes is not None:
                out[self.SUBFOLDER[key]] = shapes
        given = {self.SUBFOLDER.get(key) for key in self.file_keys if self.recipe.model.files.get(key)}
        for sub in sorted(set(self.SUBFOLDER.values()) - given) if root is not None and root.is_dir() else ():
            headers = component_headers(root / sub) if (root / sub).is_dir() else None
            if headers is not None:
                out[sub] = linear_shapes(headers)
        return out

    def file_layer_shapes(self, key: str, header: dict[str, Any]) -> dict[str, list[int] | None] | None:
        """The weight shapes of the diffusers layers the ``[model.files]`` file of slot ``key`` (its checked header)
        becomes, for ``lora_layer_shapes``; None where they are not known from the header (the default: a file in its
        own layout is not compared)."""
        return None

    def lora_target_modules(self, transformer: torch.nn.Module, preset: str, explicit: list[str]) -> list[str]:
        """Full names of the linear layers to wrap: ``explicit`` names/regexes (when given) or the preset's
        regexes, matched against ``named_modules()``. Raises RecipeError when nothing matches."""
        import torch

        from lora_run.errors import RecipeError

        patterns = explicit or self.target_presets[preset]
        compiled = []
        for p in patterns:
            try:
                compiled.append(re.compile(p))
            except re.error as exc:
                raise RecipeError(f"{self.shown}: [lora.modules] {p!r} is not a valid regular expression ({exc})")
        names = [name for name, module in transformer.named_modules()
                 if isinstance(module, torch.nn.Linear) and matches_module(name, patterns, compiled)]
        if not names:
            key = "lora.modules" if explicit else "lora.targets"
            raise RecipeError(f"{self.shown}: [{key}] matched no linear layer of the {self.family} transformer")
        return names

    def enable_gradient_checkpointing(self, transformer: torch.nn.Module) -> None:
        """Gradient checkpointing of the transformer's blocks (CPU path of ``prepare_transformer``). Default:
        diffusers' own, where the model supports it; adapters override it (HunyuanImage needs a kwargs-aware
        checkpoint function, Hunyuan-DiT has none in diffusers)."""
        if getattr(transformer, "_supports_gradient_checkpointing", False):
            transformer.enable_gradient_checkpointing()

    def inject_lora(self, module: torch.nn.Module, targets: list[str], *, rank: int, alpha: float,
                    dropout: float, init: str, adapter_name: str = "default") -> None:
        """Wrap ``targets`` of ``module`` with peft LoRA layers (diffusers' ``add_adapter`` when the model has
        it, so ``joint_attention_kwargs={"scale": s}`` works; ``peft.inject_adapter_in_model`` otherwise)."""
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                            init_lora_weights="gaussian" if init == "gaussian" else True)
        if hasattr(module, "add_adapter") and hasattr(module, "set_adapters"):
            module.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, module, adapter_name=adapter_name)

    def text_encoder_module(self) -> torch.nn.Module | None:
        """The loaded trainable text encoder (for a text-encoder LoRA), or None."""
        return self.encoders.get(self.trainable_text_encoder) if self.trainable_text_encoder else None

    def text_encoder_targets(self, module: torch.nn.Module) -> list[str]:
        """Module names of the text encoder a text-encoder LoRA wraps."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- objective
    def sample_timesteps(self, batch: int, generator: torch.Generator, latents: torch.Tensor) -> torch.Tensor:
        """Per-sample ``t`` for this objective, drawn with ``generator`` (see ``timesteps.py``)."""
        from .. import timesteps

        t = self.recipe.train
        seq_len = self.image_seq_len(latents)
        return timesteps.sample_sigmas(t.timestep_sampling, batch, generator, sigmoid_scale=t.sigmoid_scale,
                                       logit_mean=t.logit_mean, logit_std=t.logit_std, shift=t.shift,
                                       image_seq_len=seq_len, device=latents.device)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens per sample (for the resolution-dependent `flux-shift`)."""
        return int(latents.shape[-1] * latents.shape[-2])

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rectified flow by default: ``x_t = (1-σ)·x0 + σ·ε`` and the velocity target ``ε - x0``."""
        sigma = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1.0 - sigma) * x0 + sigma * noise, noise - x0

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights from `train.timestep_weighting` (flow) or Min-SNR-γ (DDPM adapters)."""
        from .. import timesteps

        return timesteps.loss_weighting(self.recipe.train.timestep_weighting, t)

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor,
                text: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
        """The model's prediction in the latent layout of ``noisy`` (unpacked, same shape)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------- outputs
    def lora_format_notes(self) -> list[str]:
        """What a tool does not load from a file this recipe writes (its `[lora]` targets against each format of
        `[output] formats`), shown by `lora-run plan`; none by default."""
        return []

    def lora_files(self, fmt: str, transformer_sd: dict[str, torch.Tensor], te_sd: dict[str, torch.Tensor],
                   *, rank: int, alpha: float, te_rank: int | None, metadata: dict[str, str]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and safetensors metadata of the LoRA in format ``fmt`` (one of ``lora_formats``).

        ``transformer_sd``/``te_sd`` are peft state dicts (``<module>.lora_A.weight`` / ``lora_B``) in fp32
        with the alpha/rank scale *not* folded in; ``metadata`` holds our run metadata (strings)."""
        raise NotImplementedError

    def output_name(self, fmt: str, base: str) -> str:
        """Relative path of the final LoRA of format ``fmt`` inside the run folder."""
        return f"{base}.safetensors" if fmt == self.lora_formats[0] else f"{fmt}/{base}.safetensors"

    # ------------------------------------------------------------------------------------ inference
    def assemble_pipeline(self, pipeline_class: Any, device: Any, dtype: Any, **extra: Any) -> Any:
        """The family's two-text-encoder diffusers pipeline from the adapter's own components
        (``_component(key, dtype)``, ``tokenizers``, ``_scheduler()``), on ``device``; ``extra`` goes to the
        pipeline class as is."""
        self._load_tokenizers()  # type: ignore[attr-defined]
        first, second = self.text_encoders
        parts = {key: self._component(key, dtype) for key in ("transformer", "vae", first, second)}  # type: ignore[attr-defined]
        pipe = pipeline_class(scheduler=self._scheduler(), vae=parts["vae"], text_encoder=parts[first],  # type: ignore[attr-defined]
                              tokenizer=self.tokenizers[first], text_encoder_2=parts[second],  # type: ignore[attr-defined]
                              tokenizer_2=self.tokenizers[second], transformer=parts["transformer"], **extra)  # type: ignore[attr-defined]
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        pipe._lora_run_dtype = dtype
        return pipe

    def pipe_placement(self, pipe: Any) -> tuple[Any, Any]:
        """(device, dtype) a pipeline built by this adapter computes on."""
        return pipe._execution_device, getattr(pipe, "_lora_run_dtype", None) or self.compute_dtype

    def pipe_text(self, pipe: Any, text: dict[str, Any], embeds: tuple[str, ...], masks: tuple[str, ...]) -> dict:
        """Pre-encoded caption tensors as pipeline keywords: ``embeds`` on the pipeline's device and dtype,
        ``masks`` on its device."""
        device, dtype = self.pipe_placement(pipe)
        return {**{k: text[k].to(device, dtype) for k in embeds}, **{k: text[k].to(device) for k in masks}}

    def initial_noise(self, pipe: Any, seeds: Sequence[int], height: int, width: int) -> Any:
        """Seeded ``(len(seeds), C, h, w)`` starting latents: row ``i`` is drawn on the CPU from ``seeds[i]`` alone
        (its own generator), so a seed gives the same noise on every device and in any batch."""
        shape = (pipe.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return seeded_noise(seeds, shape).to(*self.pipe_placement(pipe))

    def load_pipeline(self, device: Any, dtype: Any) -> Any:
        """The family's diffusers inference pipeline built from ``recipe.model``."""
        raise NotImplementedError

    def load_lora_into_pipeline(self, pipe: Any, path: Path, adapter_name: str = "identity") -> None:
        """Load a LoRA file (any of ``lora_formats``) into ``pipe``."""
        raise NotImplementedError

    def sampling_pipeline(self, transformer: torch.nn.Module) -> Any:
        """A pipeline around the transformer being trained (text encoders absent: prompts are pre-encoded)."""
        raise NotImplementedError

    def generate(self, pipe: Any, *, prompt: str | None, seed: int, steps: int, guidance: float, width: int,
                 height: int, lora_scale: float, text: dict[str, torch.Tensor] | None = None) -> Any:
        """One PIL image. ``text`` (from ``encode_captions``, batch 1) replaces ``prompt`` when given."""
        return self.generate_batch(pipe, prompt=prompt, seeds=(seed,), steps=steps, guidance=guidance, width=width,
                                   height=height, lora_scale=lora_scale, text=text)[0]

    def generate_batch(self, pipe: Any, *, prompt: str | Sequence[str] | None, seeds: Sequence[int], steps: int,
                       guidance: float, width: int, height: int, lora_scale: float,
                       text: dict[str, torch.Tensor] | None = None) -> list:
        """One PIL image per seed, in the order of ``seeds``, from one pipeline call: the starting latents are
        stacked, row ``i`` drawn from ``seeds[i]`` exactly as ``generate`` draws it alone (``seeded_noise``), so
        each image is the one-at-a-time image up to kernel-level float differences. ``prompt`` is one prompt for
        every seed or a sequence of one prompt per seed (``seed_prompts``); ``text`` (pre-encoded, from
        ``encode_captions``), which replaces it, has batch 1 (for every seed) or one row per seed. The built-in
        families override this; their pipelines pad the text to a fixed length or mask it, so an image does not
        depend on the other prompts of its batch. The default serves an adapter that implements only ``generate``
        (its pipeline is not known to take batched latents): one pipeline call per seed, with that seed's prompt
        and text row (batch 1)."""
        if type(self).generate is ModelAdapter.generate:
            raise NotImplementedError(f"{type(self).__name__} implements neither generate nor generate_batch")
        prompts = seed_prompts(prompt, seeds)
        return [self.generate(pipe, prompt=prompts[n], seed=seed, steps=steps, guidance=guidance, width=width,
                              height=height, lora_scale=lora_scale,
                              text=None if text is None else text_row(text, n, len(seeds)))
                for n, seed in enumerate(seeds)]


class SourceLoader(ModelAdapter):
    """An adapter whose components come from ``[model] source``: a hub id (cached copies only while offline) or a
    local diffusers folder with the pipeline's component folders (subclasses set ``SUBFOLDER`` and ``WHAT``;
    single files, where the family has slots, are read by the subclass). Errors name the key and component."""

    #: ``SUBFOLDER`` (and the tokenizers' subfolders, ``TOKENIZER_SUBFOLDER``); component -> what it is (messages).
    #: Unless a subclass sets them, the pipeline convention is assumed: ``transformer/``, ``vae/``, the two
    #: ``text_encoders`` in ``text_encoder/`` and ``text_encoder_2/``, their tokenizers (``<encoder>_tokenizer``)
    #: in ``tokenizer/`` and ``tokenizer_2/``; ``encoder_sources`` follows from them and ``file_keys``.
    WHAT: ClassVar[dict[str, str]] = {}
    TOKENIZER_SUBFOLDER: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if len(cls.text_encoders) == 2 and "SUBFOLDER" not in cls.__dict__:
            first, second = cls.text_encoders
            cls.SUBFOLDER = {"transformer": "transformer", "vae": "vae", first: "text_encoder", second: "text_encoder_2"}
            cls.TOKENIZER_SUBFOLDER = {f"{first}_tokenizer": "tokenizer", f"{second}_tokenizer": "tokenizer_2"}
        if cls.text_encoders and "encoder_sources" not in cls.__dict__:
            cls.encoder_sources = tuple((name, cls.SUBFOLDER[name], name if name in cls.file_keys else None)
                                        for name in cls.text_encoders)

    def encode_images(self, pixels: Any) -> Any:
        """The latent mean times the VAE's scaling factor (VAEs without a shift factor)."""
        import torch

        vae = self.encoders["vae"]
        with torch.no_grad():
            z = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        return (z * vae.config.scaling_factor).float()

    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        problems = super().check_sources()
        m = self.recipe.model
        if m.source is None:
            problems.append((("model", "source"), f"is required for {self.family}: a hub id or a local diffusers "
                             "folder with the pipeline's components"))
        elif is_local_source(m.source) and os.path.isdir(m.source):
            src = Path(m.source)
            for key, sub in {**self.SUBFOLDER, **self.TOKENIZER_SUBFOLDER}.items():
                if m.files.get(key) is None and not os.path.isdir(src / sub):
                    problems.append((("model", "source"), f"{src} has no {sub}/ folder ({self.WHAT.get(key, key)}); "
                                     f"it is not a {self.family} diffusers folder"))
        return problems

    def from_source(self, cls: Any, key: str, subfolder: str | None = None, **kw: Any) -> Any:
        sub = subfolder or self.SUBFOLDER.get(key) or self.TOKENIZER_SUBFOLDER[key]
        return self.load_from_source(cls, sub, self.WHAT.get(key, key), **kw,
                                     missing=("model.source", f"is required for {self.family}"))

    def _from_subfolder(self, cls: Any, key: str, **kw: Any) -> Any:
        return self.from_source(cls, key, **kw)


def real_tokenizer(tok: Any, minimum: int = 10) -> bool:
    """transformers 5 returns an *empty* tokenizer for a repo whose files are missing offline."""
    return len(tok) > len(set(tok.all_special_tokens)) + minimum


def write_json(path: Path, data: Any) -> None:
    """Small helper for adapters writing inferred configs (not into a run folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
