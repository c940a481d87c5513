"""What a single weights file is, judged from the tensor names (and a few shapes) of its safetensors header: a
``[model.files]`` file of another component or family (``ae.safetensors`` given as the transformer, a text encoder
as the VAE, a FLUX.2 transformer for FLUX.1, a LoRA) is named by ``lora-run check`` before the dataset is linted or
anything is loaded, with what the file looks like instead. No torch; nothing but the header is read.

A :class:`Layout` is one kind of file; ``KNOWN`` lists every kind lora-run recognises, the more specific first.
Each family's adapter declares, per ``[model.files]`` slot, the layouts its single-file loader converts
(``file_layouts``). What a layout requires is what that loader itself requires of a file (the tensors its
conversion reads first, a tensor the model has no place for, a shape its model cannot take), so no file the
loader would load is refused; the names match under any prefix (ComfyUI's ``model.diffusion_model.``,
``vae.``, ``text_encoders.clip_l.transformer.`` …), where the loaders strip only the prefixes they know.
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

    def matches(self, shapes: Mapping[str, Sequence[int] | None]) -> bool:
        """Whether a file whose tensors have these names and shapes (None: not known, a quantized tensor) is of
        this layout."""
        if not all(any(re.search(p, name) for name in shapes) for p in self.needs):
            return False
        if any(re.search(p, name) for p in self.lacks for name in shapes):
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
#: BFL's ``flux2-vae.safetensors``: the LDM layout with the batch-norm statistics of the latents
FLUX2_VAE = Layout("a FLUX.2 autoencoder (as flux2-vae.safetensors)", (_AT + r"encoder\.down\.\d+\.",
                                                                       _AT + r"bn\.running_mean$"))
#: ``AutoencoderKL`` in the LDM layout: no batch norm (a tensor it has no place for) and its down- and upsampling
#: convolutions keep their channels (HunyuanImage's change them)
FLUX1_VAE = Layout("a FLUX.1 autoencoder (LDM layout, as ae.safetensors)",
                   (_AT + r"encoder\.down\.\d+\.", _AT + r"decoder\.up\.\d+\."), lacks=_NO_BATCH_NORM,
                   square=r"(?:down|up)sample\.conv\.weight$")
#: Tencent's LDM-like layout (``encoder.down.N.block.M``) or diffusers' flat one (``encoder.down_blocks.N.conv1``)
HUNYUAN_IMAGE_VAE = Layout("a HunyuanImage-2.1 autoencoder",
                           (_AT + r"encoder\.down(?:\.\d+\.block\.\d+|_blocks\.\d+)\.conv1\.weight$",),
                           lacks=_NO_BATCH_NORM)
DIFFUSERS_VAE = Layout("an autoencoder in diffusers' layout (a vae/ folder's weights)",
                       (_AT + r"encoder\.down_blocks\.\d+\.resnets\.",))
# ------------------------------------------------------------------------------ text encoders (transformers')
CLIP_TEXT = Layout("a CLIP text encoder", (_AT + r"embeddings\.token_embedding\.weight$",))
T5_ENCODER = Layout("a T5 encoder", (_AT + r"encoder\.block\.\d+\.layer\.",
                                     _AT + r"(?:shared|encoder\.embed_tokens)\.weight$"))
_EMBED = _AT + r"embed_tokens\.weight$"
#: Qwen2.5's attention has biases, Qwen3's normalises q and k; Mistral-3 has a vision tower
QWEN2_5_VL = Layout("a Qwen2.5-VL text encoder", (_EMBED, _AT + r"layers\.\d+\.self_attn\.q_proj\.bias$"))
QWEN3 = Layout("a Qwen3 text encoder", (_EMBED, _AT + r"layers\.\d+\.self_attn\.q_norm\.weight$"))
MISTRAL3 = Layout("a Mistral-3 text encoder", (_EMBED, _AT + r"vision_tower\.", _AT + r"multi_modal_projector\."))
BERT = Layout("a BERT text encoder", (_AT + r"embeddings\.word_embeddings\.weight$",))

#: every layout lora-run recognises, the more specific first (``identify`` takes the first that matches)
KNOWN: tuple[Layout, ...] = (
    LORA, FLUX2_TRANSFORMER, FLUX1_TRANSFORMER, FLUX1_DIFFUSERS_TRANSFORMER, HUNYUAN_IMAGE_TRANSFORMER,
    HUNYUAN_IMAGE_DIFFUSERS_TRANSFORMER, HUNYUAN_DIT_TRANSFORMER, FLUX2_VAE, FLUX1_VAE, HUNYUAN_IMAGE_VAE,
    DIFFUSERS_VAE, CLIP_TEXT, T5_ENCODER, QWEN2_5_VL, QWEN3, MISTRAL3, BERT)


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
