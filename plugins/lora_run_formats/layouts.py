"""What a single weights file is, judged from the tensor names (and a few shapes) of its safetensors header: a
``[model.files]`` file of another component or family (``ae.safetensors`` given as the transformer or as
HunyuanImage-2.1's autoencoder, a text encoder as the VAE, a FLUX.2 transformer for FLUX.1, a LoRA) is named by
``lora-run check`` before the dataset is linted or anything is loaded, with what the file looks like instead. No
torch; nothing but the header is read.

A :class:`Layout` is one kind of file; ``KNOWN`` lists every kind lora-run recognises, the more specific first.
Each family's adapter declares, per ``[model.files]`` slot, the layouts its single-file loader converts
(``file_layouts``). What a layout requires is what that loader itself requires of a file (the tensors its
conversion reads first, a tensor the model has no place for, a shape its model cannot take), so no file the
loader would load is refused; the names match under any prefix (ComfyUI's ``model.diffusion_model.``,
``vae.``, ``text_encoders.clip_l.transformer.`` …), where the loaders strip only the prefixes they know. Where two
kinds share their names (FLUX.1's ``ae.safetensors`` and HunyuanImage-2.1's autoencoder are both LDM-style
autoencoders), a shape tells them apart (``sizes``: the latent channels of the decoder's input, 16 and 64).

Some files of the same layout differ only in width (CLIP-L and CLIP-G, T5-XXL and ByT5, Qwen3-4B and -8B): a
:class:`Link` declares a width a slot's file shares with the family's transformer file (CLIP-L's hidden size is
the width of FLUX.1's pooled-text input), so a file of another model size is named when the transformer is given
as a file too (``link_problem``); against a ``[model] source`` folder, the component's config.json does it
(``model_files.file_fit_problems``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lora_run.files import shown

from .config_fit import header_shapes

#: a pattern after it matches at the start of a tensor name or of any dotted part of it (under any prefix)
_AT = r"(?:^|\.)"


@dataclass(frozen=True)
class Layout:
    """One kind of single weights file. ``what`` it is, in messages ("a FLUX.1 autoencoder (LDM layout …)");
    ``needs``: regular expressions each of which some tensor name matches (``re.search``); ``lacks``: ones no
    tensor name matches; ``square``: the tensors (names it matches) whose first two dimensions are equal."""

    what: str
    needs: tuple[str, ...]
    lacks: tuple[str, ...] = ()
    square: str | None = None
    #: (pattern, dimension, size): every tensor whose name matches has that size along that dimension (where its
    #: shape is known)
    sizes: tuple[tuple[str, int, int], ...] = ()

    def matches(self, shapes: Mapping[str, Sequence[int] | None]) -> bool:
        """Whether a file whose tensors have these names and shapes (None: not known, a quantized tensor) is of
        this layout."""
        if not all(any(re.search(p, name) for name in shapes) for p in self.needs):
            return False
        if any(re.search(p, name) for p in self.lacks for name in shapes):
            return False
        for pattern, dim, size in self.sizes:
            if any(s is not None and len(s) > dim and s[dim] != size
                   for name, s in shapes.items() if re.search(pattern, name)):
                return False
        square = re.compile(self.square) if self.square else None
        return square is None or all(s is None or len(s) < 2 or s[0] == s[1]
                                     for name, s in shapes.items() if square.search(name))


LORA = Layout("a LoRA, not a model's weights", (r"\.(?:lora_down|lora_up|lora_A|lora_B)\.weight$",))
# ---------------------------------------------------------------------------------------------- transformers
#: FLUX.2's shared modulation, in BFL's layout and in diffusers' (``lora_run_flux2.files``)
FLUX2_TRANSFORMER = Layout("a FLUX.2 transformer", (_AT + r"single_stream_modulation\.",))
#: what ``lora_run_flux.files.transformer_bfl_to_diffusers`` needs of each double block: its own modulation (FLUX.2
#: shares one; HunyuanImage's is ``img_mod.linear``)
FLUX1_TRANSFORMER = Layout("a FLUX.1 transformer (BFL layout, as flux1-dev.safetensors)",
                           (_AT + r"double_blocks\.\d+\.img_mod\.lin\.weight$",))
FLUX1_DIFFUSERS_TRANSFORMER = Layout("a FLUX.1 transformer in diffusers' layout (a transformer/ folder's weights)",
                                     (_AT + r"x_embedder\.weight$",
                                      _AT + r"transformer_blocks\.\d+\.norm1\.linear\.weight$"))
#: ``lora_run_hunyuan_image.files``: Tencent's names, and diffusers' (used as they are)
HUNYUAN_IMAGE_TRANSFORMER = Layout("a HunyuanImage-2.1 transformer (Tencent's layout, as "
                                   "hunyuanimage2.1.safetensors)",
                                   (_AT + r"img_in\.proj\.weight$", _AT + r"double_blocks\.\d+\.img_attn_qkv\.weight$"))
HUNYUAN_IMAGE_DIFFUSERS_TRANSFORMER = Layout("a HunyuanImage-2.1 transformer in diffusers' layout",
                                             (_AT + r"x_embedder\.proj\.weight$", _AT + r"transformer_blocks\.\d+\."))
HUNYUAN_DIT_TRANSFORMER = Layout("a Hunyuan-DiT transformer", (_AT + r"pos_embed\.proj\.weight$",
                                                               _AT + r"blocks\.\d+\.attn1\."))
# ---------------------------------------------------------------------------------------------- autoencoders
_NO_BATCH_NORM = (_AT + r"bn\.running_mean$",)
_LDM = (_AT + r"encoder\.down\.\d+\.", _AT + r"decoder\.up\.\d+\.")
#: the decoder's input convolution takes the latents: its dimension 1 is the latent channels (every layout here)
LATENT = _AT + r"decoder\.conv_in\.weight$"
#: BFL's ``flux2-vae.safetensors``: the LDM layout with the batch-norm statistics of the latents
FLUX2_VAE = Layout("a FLUX.2 autoencoder (as flux2-vae.safetensors)", (_AT + r"encoder\.down\.\d+\.",
                                                                       _AT + r"bn\.running_mean$"))
#: ``AutoencoderKL`` in the LDM layout: no batch norm (a tensor it has no place for), 16 latent channels (FLUX.1's
#: transformer takes 4 × 16), and its down- and upsampling convolutions keep their channels (HunyuanImage's change
#: them). SD3's autoencoder has the same architecture and cannot be told apart from the header.
FLUX1_VAE = Layout("a FLUX.1 autoencoder (LDM layout, 16 latent channels, as ae.safetensors)", _LDM,
                   lacks=_NO_BATCH_NORM, square=r"(?:down|up)sample\.conv\.weight$", sizes=((LATENT, 1, 16),))
#: Stable Diffusion 1.x / 2.x / SDXL: the same LDM layout with 4 latent channels (and its quant convolutions)
SD_VAE = Layout("a Stable Diffusion autoencoder (LDM layout, 4 latent channels: SD 1.x, 2.x or SDXL's, as "
                "sdxl_vae.safetensors)", _LDM, lacks=_NO_BATCH_NORM, sizes=((LATENT, 1, 4),))
#: Tencent's LDM-like layout (``encoder.down.N.block.M``) or diffusers' flat one (``encoder.down_blocks.N.conv1``),
#: 64 latent channels (``AutoencoderKLHunyuanImage``, sd-scripts' ``HunyuanVAE2D``): FLUX.1's ``ae.safetensors``
#: has the same names, and 16
HUNYUAN_IMAGE_VAE = Layout("a HunyuanImage-2.1 autoencoder (32×, 64 latent channels, as "
                           "hunyuan_image_2.1_vae_fp16.safetensors)",
                           (_AT + r"encoder\.down(?:\.\d+\.block\.\d+|_blocks\.\d+)\.conv1\.weight$",),
                           lacks=_NO_BATCH_NORM, sizes=((LATENT, 1, 64),))
DIFFUSERS_VAE = Layout("an autoencoder in diffusers' layout (a vae/ folder's weights)",
                       (_AT + r"encoder\.down_blocks\.\d+\.resnets\.",))
# ------------------------------------------------------------------------------ text encoders (transformers')
#: the tensors whose dimension 1 is a text encoder's hidden size, under any prefix (the embedding tables: CLIP's, T5's,
#: a language model's)
CLIP_HIDDEN = _AT + r"embeddings\.token_embedding\.weight$"
T5_HIDDEN = _AT + r"(?:shared|encoder\.embed_tokens)\.weight$"
LM_HIDDEN = _AT + r"embed_tokens\.weight$"
CLIP_TEXT = Layout("a CLIP text encoder", (CLIP_HIDDEN,))
#: OpenCLIP's (and OpenAI's) own names, as SD 2.x and SDXL checkpoints hold their text towers
OPEN_CLIP = Layout("a CLIP model in OpenCLIP's own layout (transformer.resblocks.N …), not transformers' CLIP text "
                   "model", (_AT + r"transformer\.resblocks\.\d+\.attn\.in_proj_weight$",))
#: UMT5 (Wan's ``umt5_xxl``) has a relative attention bias in every block, T5 and mT5 in the first only
_EVERY_BLOCK_BIAS = _AT + r"encoder\.block\.[1-9]\d*\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$"
UMT5_ENCODER = Layout("a UMT5 encoder (a relative attention bias in every block, as umt5_xxl_fp16.safetensors)",
                      (_AT + r"encoder\.block\.\d+\.layer\.", _EVERY_BLOCK_BIAS))
T5_ENCODER = Layout("a T5 encoder", (_AT + r"encoder\.block\.\d+\.layer\.",
                                     T5_HIDDEN), lacks=(_EVERY_BLOCK_BIAS,))
#: Qwen2.5's attention has biases, Qwen3's normalises q and k; Mistral-3 has a vision tower
QWEN2_5_VL = Layout("a Qwen2.5-VL text encoder", (LM_HIDDEN, _AT + r"layers\.\d+\.self_attn\.q_proj\.bias$"))
QWEN3 = Layout("a Qwen3 text encoder", (LM_HIDDEN, _AT + r"layers\.\d+\.self_attn\.q_norm\.weight$"))
MISTRAL3 = Layout("a Mistral-3 text encoder", (LM_HIDDEN, _AT + r"vision_tower\.", _AT + r"multi_modal_projector\."))
BERT = Layout("a BERT text encoder", (_AT + r"embeddings\.word_embeddings\.weight$",))

#: every layout lora-run recognises, the more specific first (``identify`` takes the first that matches)
KNOWN: tuple[Layout, ...] = (
    LORA, FLUX2_TRANSFORMER, FLUX1_TRANSFORMER, FLUX1_DIFFUSERS_TRANSFORMER, HUNYUAN_IMAGE_TRANSFORMER,
    HUNYUAN_IMAGE_DIFFUSERS_TRANSFORMER, HUNYUAN_DIT_TRANSFORMER, FLUX2_VAE, FLUX1_VAE, SD_VAE, HUNYUAN_IMAGE_VAE,
    DIFFUSERS_VAE, CLIP_TEXT, OPEN_CLIP, UMT5_ENCODER, T5_ENCODER, QWEN2_5_VL, QWEN3, MISTRAL3, BERT)


def identify(shapes: Mapping[str, Sequence[int] | None]) -> Layout | None:
    """The first of ``KNOWN`` a file with these tensors is, or None."""
    return next((layout for layout in KNOWN if layout.matches(shapes)), None)


def layout_problem(header: Mapping[str, Any], accepted: Sequence[Layout]) -> str | None:
    """Why a file with this checked header is none of the ``accepted`` layouts (the words follow the file's name:
    "is a FLUX.1 autoencoder (…), not a FLUX.1 transformer (…)"), or None; None too where nothing is declared."""
    shapes = header_shapes(header)
    if not accepted or any(layout.matches(shapes) for layout in accepted):
        return None
    wanted = " or ".join(layout.what for layout in accepted)
    found = identify(shapes)
    if found is not None:
        return f"is {found.what}, not {wanted}"
    if not shapes:
        return f"holds no tensors: not {wanted}"
    sample = ", ".join(shown(name[:100]) for name in sorted(shapes)[:2])
    return (f"is not {wanted}, nor any model file lora-run knows (its {len(shapes)} tensors are named like {sample}"
            f"{' …' if len(shapes) > 2 else ''})")


# ------------------------------------------------------------------------------------------- widths shared
@dataclass(frozen=True)
class Link:
    """A width the ``slot``'s file shares with the family's transformer file: dimension ``dim`` of the file's tensor
    ``tensor`` (a pattern searched in its names), times ``factor``, is dimension ``takes_dim`` of the transformer's
    tensor ``takes`` (searched in its names: any layout the transformer slot takes). ``says``: the file's width in
    words, ``{}`` for the number ("is {} wide", "has {} latent channels"); ``known``: (width, whose) of released
    files, for the messages."""

    slot: str
    tensor: str
    takes: str
    says: str
    dim: int = 1
    takes_dim: int = 1
    factor: int = 1
    known: tuple[tuple[int, str], ...] = ()


#: the widths of released files, named in the messages
CLIP_WIDTHS = ((512, "CLIP-B's"), (768, "CLIP-L's"), (1024, "CLIP-H's"), (1280, "CLIP-G's"))
T5_WIDTHS = ((768, "T5-base's"), (1024, "T5-large's"), (1472, "ByT5-small's, HunyuanImage-2.1's glyph encoder"),
             (2048, "T5-XL's or mT5-XL's, Hunyuan-DiT's"), (4096, "T5-XXL's"))
QWEN_WIDTHS = ((2048, "Qwen2.5-VL-3B's"), (2560, "Qwen3-4B's"), (3584, "Qwen2.5-VL-7B's"), (4096, "Qwen3-8B's"),
               (5120, "Mistral-Small-3's"))
LATENT_CHANNELS = ((4, "Stable Diffusion's"), (16, "FLUX.1's"), (32, "FLUX.2's"), (64, "HunyuanImage-2.1's"))


def width(shapes: Mapping[str, Sequence[int] | None], pattern: str, dim: int) -> tuple[str, list[int]] | None:
    """(the name and shape of) the first tensor, by name, matching ``pattern`` whose shape is known and has
    dimension ``dim``, or None."""
    for name in sorted(shapes):
        shape = shapes[name]
        if re.search(pattern, name) and shape is not None and len(shape) > dim:
            return name, list(shape)
    return None


def link_problem(link: Link, shapes: Mapping[str, Sequence[int] | None],
                 transformer: Mapping[str, Sequence[int] | None], transformer_path: Any) -> str | None:
    """Why a file with these tensors (``shapes``) does not fit, along ``link``, the transformer file at
    ``transformer_path`` with the tensors ``transformer`` (the words follow the file's name), or None; None too
    where either width is not known."""
    own, takes = width(shapes, link.tensor, link.dim), width(transformer, link.takes, link.takes_dim)
    if own is None or takes is None:
        return None
    has, wants = own[1][link.dim], takes[1][link.takes_dim]
    if has * link.factor == wants:
        return None
    whose = dict(link.known)
    expected = wants // link.factor if wants % link.factor == 0 else None
    evidence = "; ".join(([whose[expected]] if expected in whose else []) + [f"its {takes[0]} is {takes[1]}"])
    built = f"{expected}" if expected is not None else f"{wants}/{link.factor}"
    return (f"{link.says.format(has)}{f' ({whose[has]})' if has in whose else ''}, but the transformer "
            f"{shown(str(transformer_path))} is built for {built} ({evidence}): one of the two files is of another "
            "model or model size")
