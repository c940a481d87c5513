"""Tiny randomly initialised FLUX.2 models, built offline (tests, benchmarks' smoke runs).

``build_tiny_flux2(folder, variant)`` writes a complete diffusers folder — ``Flux2KleinPipeline``
(``variant="klein"``, Qwen3 text encoder, ``is_distilled`` from ``distilled``) or ``Flux2Pipeline``
(``variant="dev"``, Mistral-3 text encoder, guidance embedding) — with byte-level BPE tokenizers built in
memory (a chat template in the layout the pipelines call), text encoders deep enough for the hidden-state
layers FLUX.2 reads (Qwen3: 9/18/27, Mistral-3: 10/20/30) but 16 wide, an 8× ``AutoencoderKLFlux2`` with
non-trivial batch-norm statistics, and a ``Flux2Transformer2DModel`` with one double and one single block.
``write_single_files(folder, out)`` writes the transformer in BFL layout (what ComfyUI users download) and the
text encoder as one file. Nothing is downloaded; a build takes a few seconds.
"""
from __future__ import annotations

from pathlib import Path

TINY = {"text_hidden": 16, "head_dim": 16, "heads": 2, "latent_channels": 8, "vae_channels": (32, 32, 32, 32)}

_QWEN_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}")
_MISTRAL_TEMPLATE = (
    "<s>{%- for m in messages %}{%- if m['content'] is string %}{%- set t = m['content'] %}"
    "{%- else %}{%- set t = m['content'][0]['text'] %}{%- endif %}"
    "{%- if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ t }}[/SYSTEM_PROMPT]{%- else %}[INST]{{ t }}[/INST]"
    "{%- endif %}{%- endfor %}")


def _byte_bpe(specials: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` over the 256 byte symbols plus ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for s in specials:
        vocab[s] = len(vocab)
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(specials), pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", model_max_length=512)
    tok.chat_template = _QWEN_TEMPLATE
    return tok


def mistral_tokenizer():
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(specials), pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", model_max_length=512)
    tok.chat_template = _MISTRAL_TEMPLATE
    return tok


def _text_encoder(variant: str, vocab: int):
    h, n = TINY["text_hidden"], 2
    if variant == "klein":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h,
                                            num_hidden_layers=27, num_attention_heads=n, num_key_value_heads=1,
                                            head_dim=h // n, max_position_embeddings=1024, tie_word_embeddings=True))
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=30,
                         num_attention_heads=n, num_key_value_heads=1, head_dim=h // n, max_position_embeddings=1024)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                 image_size=32, patch_size=16, head_dim=16)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision, image_token_index=8,
                                                           spatial_merge_size=1))


def build_tiny_flux2(folder: str | Path, variant: str = "klein", *, distilled: bool = False, seed: int = 0) -> Path:
    """Write a tiny random FLUX.2 ``variant`` ("klein" or "dev") diffusers folder to ``folder``; returns it."""
    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline,
                           Flux2Transformer2DModel)

    from lora_run_native.adapters.base import quiet_libraries

    if variant not in ("klein", "dev"):
        raise ValueError(f"variant must be 'klein' or 'dev', not {variant!r}")
    quiet_libraries()
    folder = Path(folder)
    tok = qwen_tokenizer() if variant == "klein" else mistral_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder = _text_encoder(variant, len(tok))
        ch = TINY["vae_channels"]
        vae = AutoencoderKLFlux2(block_out_channels=ch, down_block_types=("DownEncoderBlock2D",) * len(ch),
                                 up_block_types=("UpDecoderBlock2D",) * len(ch), layers_per_block=1,
                                 latent_channels=TINY["latent_channels"], norm_num_groups=32)
        vae.bn.running_mean.copy_(torch.randn(4 * TINY["latent_channels"]) * 0.1)
        vae.bn.running_var.copy_(torch.rand(4 * TINY["latent_channels"]) + 0.5)
        hd = TINY["head_dim"]
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * TINY["latent_channels"], num_layers=1, num_single_layers=1,
            attention_head_dim=hd, num_attention_heads=TINY["heads"], joint_attention_dim=3 * TINY["text_hidden"],
            timestep_guidance_channels=32, axes_dims_rope=(hd // 4,) * 4, guidance_embeds=variant == "dev")
    finally:
        torch.random.set_rng_state(state)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tok, transformer=transformer)
    pipe = Flux2KleinPipeline(**parts, is_distilled=distilled) if variant == "klein" else Flux2Pipeline(**parts)
    pipe.save_pretrained(folder)
    return folder


def write_single_files(folder: str | Path, out: str | Path) -> dict[str, Path]:
    """The model in ``folder`` as single files: ``transformer`` in BFL layout under ``model.diffusion_model.``
    (``flux2.safetensors``), the autoencoder in BFL/LDM layout with its batch-norm statistics
    (``flux2-vae.safetensors``; FLUX.1's LDM writer) and the text encoder as one file
    (``text_encoder.safetensors``)."""
    from safetensors.torch import load_file, save_file

    from lora_run_flux.files import vae_diffusers_to_ldm

    from .files import transformer_diffusers_to_bfl

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def read(sub: str) -> dict:
        sd: dict = {}
        for f in sorted((folder / sub).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        return sd

    paths = {"transformer": out / "flux2.safetensors", "vae": out / "flux2-vae.safetensors",
             "text_encoder": out / "text_encoder.safetensors"}
    vae = read("vae")
    stats = {k: vae.pop(k) for k in list(vae) if k.startswith("bn.")}
    save_file({**{k: v.contiguous() for k, v in vae_diffusers_to_ldm(vae).items()}, **stats}, str(paths["vae"]))
    bfl = transformer_diffusers_to_bfl(read("transformer"))
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}, str(paths["transformer"]))
    save_file({k: v.contiguous() for k, v in read("text_encoder").items()}, str(paths["text_encoder"]))
    return paths
