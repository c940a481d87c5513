"""Random-weight model files in exactly the layouts the real engines load (for bench/engines_gpu.py and the
CPU proof of the kohya backend; no download, nothing committed).

Run it with the *engine's* interpreter (the one that has sd-scripts' requirements), because the tensor names
and shapes are read from the engine's own model classes, built on the meta device:

    ENGINE_PY bench/engine_models.py flux --sd-scripts /work/engines/sd-scripts --out /tmp/flux-files \
        [--double 1 --single 1] [--t5-layers 1] [--dtype bf16]

FLUX.1 (sd-scripts): ``flux1-dev.safetensors`` (BFL layout under ``model.diffusion_model.``, full width,
``--double``/``--single`` blocks; sd-scripts reads the block counts from the file), ``ae.safetensors``
(the full FLUX autoencoder; sd-scripts' AE config is fixed), ``clip_l.safetensors`` (full CLIP-L, names
``text_model.*``), ``t5xxl.safetensors`` (T5-XXL width; ``--t5-layers`` encoder blocks: sd-scripts' T5 config
is fixed at 24 blocks, so fewer blocks need ``LORA_RUN_T5_LAYERS`` set for the run, see
bench/engine_shim/sitecustomize.py) and ``tokenizers/`` (offline CLIP and T5 tokenizers in the
``--tokenizer_cache_dir`` layout: ``openai_clip-vit-large-patch14`` and ``google_t5-v1_1-xxl``).
Weights are N(0, 0.02) (norm scales 1, biases 0) from a fixed seed.
"""
from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _random_state(module, dtype, seed: int, skip: tuple[str, ...] = ()) -> dict:
    """Random tensors for every entry of a meta-device module's state_dict."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if name in skip:
            continue
        shape = tuple(t.shape)
        last = name.rsplit(".", 1)[-1]
        if not t.is_floating_point():
            out[name] = torch.zeros(shape, dtype=t.dtype) if t.is_meta else t.clone()
            continue
        if not t.is_meta and "position" in name:          # real buffers (e.g. position ids) keep their values
            out[name] = t.detach().clone().to(dtype)
            continue
        if last in ("scale",) or (last == "weight" and len(shape) == 1 and "norm" in name.lower()):
            out[name] = torch.ones(shape, dtype=dtype)
        elif last == "bias" or len(shape) == 0:
            out[name] = torch.zeros(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return out


def _tokenizers(folder: Path) -> Path:
    """Offline stand-ins for the two tokenizers sd-scripts fetches for FLUX.1 (CLIP-L byte-level BPE with no
    merges; T5 unigram), written where ``--tokenizer_cache_dir`` looks: ``<dir>/<repo id with / → _>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    clip_dir = folder / "openai_clip-vit-large-patch14"
    clip_dir.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (clip_dir / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (clip_dir / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    (clip_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), "utf-8")

    t5_dir = folder / "google_t5-v1_1-xxl"
    t5_dir.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_lowercase + string.digits + ",.!?'-{}":
        pieces += [(ch, -5.0), ("\u2581" + ch, -4.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(str(t5_dir))
    cfg = json.loads((t5_dir / "tokenizer_config.json").read_text("utf-8"))
    cfg["tokenizer_class"] = "T5Tokenizer"
    cfg["extra_ids"] = 0
    (t5_dir / "tokenizer_config.json").write_text(json.dumps(cfg), "utf-8")
    return folder


def build_flux(sd_scripts: Path, out: Path, double: int, single: int, t5_layers: int, dtype_name: str,
               seed: int = 0) -> dict[str, str]:
    import dataclasses

    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(sd_scripts))
    from library import flux_models  # the engine's own model classes: exactly its tensor names and shapes
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    dtype = getattr(torch, DTYPES[dtype_name])
    out.mkdir(parents=True, exist_ok=True)
    spec = flux_models.configs["dev"]
    params = dataclasses.replace(spec.params, depth=double, depth_single_blocks=single)
    paths = {k: out / f for k, f in (("transformer", "flux1-dev.safetensors"), ("vae", "ae.safetensors"),
                                     ("clip_l", "clip_l.safetensors"), ("t5xxl", "t5xxl.safetensors"))}
    with torch.device("meta"):
        flux = flux_models.Flux(params)
    sd = _random_state(flux, dtype, seed)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()}, str(paths["transformer"]))
    del sd, flux
    with torch.device("meta"):
        ae = flux_models.AutoEncoder(spec.ae_params)
    save_file({k: v.contiguous() for k, v in _random_state(ae, dtype, seed + 1).items()}, str(paths["vae"]))
    clip_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                              projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.device("meta"):
        clip = CLIPTextModel(clip_cfg)
    save_file({k: v.contiguous() for k, v in _random_state(clip, dtype, seed + 2).items()}, str(paths["clip_l"]))
    t5_cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128)
    with torch.device("meta"):
        t5 = T5EncoderModel(t5_cfg)
    save_file({k: v.contiguous() for k, v in _random_state(t5, dtype, seed + 3,
                                                           skip=("encoder.embed_tokens.weight",)).items()},
              str(paths["t5xxl"]))
    tokenizers = _tokenizers(out / "tokenizers")
    result = {k: str(v) for k, v in paths.items()} | {"tokenizers": str(tokenizers), "double": double,
                                                      "single": single, "t5_layers": t5_layers}
    (out / "layout.json").write_text(json.dumps(result, indent=1), "utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("flux", help="FLUX.1 single files for sd-scripts")
    f.add_argument("--sd-scripts", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--double", type=int, default=1)
    f.add_argument("--single", type=int, default=1)
    f.add_argument("--t5-layers", type=int, default=1)
    f.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    if args.what == "flux":
        print(json.dumps(build_flux(args.sd_scripts, args.out, args.double, args.single, args.t5_layers, args.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
