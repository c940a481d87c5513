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

HunyuanImage-2.1 (sd-scripts' ``hunyuan_image_train_network.py``):

    ENGINE_PY bench/engine_models.py hunyuan --sd-scripts /work/engines/sd-scripts --out /tmp/hy-files \
        [--double 1 --single 1 --qwen-layers 2 --qwen-vision 1]    # 0 = the engine's full size

writes ``dit.safetensors`` (the DiT in sd-scripts' own names, ``double_blocks.*``/``single_blocks.*``, strict
load), ``vae.safetensors`` (the full 32x VAE, strict), ``qwen.safetensors`` (Qwen2.5-VL-7B at full width in the
original checkpoint names ``model.*``/``visual.*``/``lm_head.weight`` that sd-scripts renames, strict),
``byt5.safetensors`` (the ByT5-small encoder with the glyph tokens added: ``encoder.*`` + ``shared.weight``),
``tokenizers/`` (``--tokenizer_cache_dir``: ``Qwen_Qwen2.5-VL-7B-Instruct`` and ``google_byt5-small``) and
``hf-cache/`` (the same two in Hugging Face's hub-cache layout: sd-scripts' ``load_qwen2_5_vl`` and
``load_byt5`` call ``from_pretrained`` on the hub ids without a cache folder, lines 499 and 209 of
``library/hunyuan_image_text_encoder.py``; with ``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1`` they
resolve offline). Reduced block counts need the shim's variables (``layout.json`` lists them under ``env``).
Every module is taken from sd-scripts' own functions (``create_model``, ``HunyuanVAE2D``, ``load_qwen2_5_vl``'s
and ``load_byt5``'s models, captured before they load a file), so names and shapes are the engine's.
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


QWEN_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
BYT5_ID = "google/byt5-small"
#: any 40-hex revision: the hub cache resolves ``refs/main`` to it
CACHE_REVISION = "0" * 39 + "1"


def hunyuan_env(double: int, single: int, qwen_layers: int, qwen_vision: int) -> dict[str, str]:
    """The shim variables (bench/engine_shim) a reduced HunyuanImage-2.1 layout needs at load time."""
    env = {}
    if double or single:
        env["LORA_RUN_HY_BLOCKS"] = f"{double or 20},{single or 40}"
    if qwen_layers or qwen_vision:
        env["LORA_RUN_QWEN_LAYERS"] = f"{qwen_layers or 28},{qwen_vision or 32}"
    return env


def _hunyuan_tokenizers(folder: Path, cache: Path) -> None:
    """Offline stand-ins for the Qwen2.5-VL tokenizer (byte-level BPE over the 256 byte symbols, no merges,
    Qwen's chat specials) and the real ByT5 tokenizer (it has no vocabulary file: bytes + 3 specials + 125
    extra ids), in ``--tokenizer_cache_dir``'s layout and in the hub cache (``models--org--name``)."""
    import shutil

    from tokenizers import pre_tokenizers
    from transformers import ByT5Tokenizer, Qwen2Tokenizer

    qdir = folder / QWEN_ID.replace("/", "_")
    qdir.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    (qdir / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (qdir / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    qwen = Qwen2Tokenizer(str(qdir / "vocab.json"), str(qdir / "merges.txt"), unk_token=None, bos_token=None,
                          eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    qwen.save_pretrained(str(qdir))
    bdir = folder / BYT5_ID.replace("/", "_")
    ByT5Tokenizer().save_pretrained(str(bdir))
    for repo, src in ((QWEN_ID, qdir), (BYT5_ID, bdir)):
        base = cache / ("models--" + repo.replace("/", "--"))
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(CACHE_REVISION, "utf-8")
        snap = base / "snapshots" / CACHE_REVISION
        if snap.exists():
            shutil.rmtree(snap)
        shutil.copytree(src, snap)


class _Captured(Exception):
    def __init__(self, module) -> None:
        super().__init__("captured")
        self.module = module


def hunyuan_modules(sd_scripts: Path):
    """sd-scripts' own HunyuanImage-2.1 modules on the meta device, as its loaders build them just before they
    read a file: {"dit", "vae", "qwen", "byt5"} → nn.Module. The text encoders are captured from inside
    ``load_qwen2_5_vl``/``load_byt5`` (their configs are local JSON strings there; ``load_byt5`` also adds
    the glyph tokens and resizes the embedding), so the layouts follow the engine, not a copy of it."""
    import torch

    if str(sd_scripts) not in sys.path:
        sys.path.insert(0, str(sd_scripts))
    from library import hunyuan_image_models, hunyuan_image_text_encoder as te, hunyuan_image_vae

    out = {"dit": hunyuan_image_models.create_model("torch", False, None)}
    with torch.device("meta"):
        out["vae"] = hunyuan_image_vae.HunyuanVAE2D()

    real_qwen = te.Qwen2_5_VLForConditionalGeneration

    class GrabQwen:
        @staticmethod
        def _from_config(config, *args, **kwargs):
            raise _Captured(real_qwen._from_config(config, *args, **kwargs))

    real_add = te.add_special_token

    def grab_byt5(tokenizer, text_encoder):
        real_add(tokenizer, text_encoder)
        raise _Captured(text_encoder)

    try:
        te.Qwen2_5_VLForConditionalGeneration, te.add_special_token = GrabQwen, grab_byt5
        for key, load in (("qwen", te.load_qwen2_5_vl), ("byt5", te.load_byt5)):
            try:
                load(None, None, "cpu", state_dict={})
            except _Captured as got:
                out[key] = got.module
            else:
                raise RuntimeError(f"sd-scripts' {load.__name__} did not build its model as expected")
    finally:
        te.Qwen2_5_VLForConditionalGeneration, te.add_special_token = real_qwen, real_add
    return out


def hunyuan_file_keys(name: str, state_keys) -> list[str]:
    """The names a HunyuanImage-2.1 file holds for a module's state_dict keys (the inverse of the renames
    sd-scripts' loaders apply)."""
    if name == "qwen":
        def rename(k):
            if k.startswith("model.language_model."):
                return "model." + k[len("model.language_model."):]
            if k.startswith("model.visual."):
                return "visual." + k[len("model.visual."):]
            return k
        return [rename(k) for k in state_keys]
    if name == "byt5":
        return ["shared.weight" if k == "embed_tokens.weight" else "encoder." + k for k in state_keys]
    return list(state_keys)


def build_hunyuan(sd_scripts: Path, out: Path, double: int, single: int, qwen_layers: int, qwen_vision: int,
                  dtype_name: str, seed: int = 0) -> dict:
    """Random-weight HunyuanImage-2.1 files for sd-scripts (0 for a count = the engine's full size)."""
    import os
    import runpy

    env = hunyuan_env(double, single, qwen_layers, qwen_vision)
    cache = out / "hf-cache"
    if "huggingface_hub" in sys.modules:   # it reads HF_HUB_CACHE once, at import
        raise RuntimeError("build_hunyuan must run in a fresh process (huggingface_hub is already imported)")
    os.environ.update(env, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out.mkdir(parents=True, exist_ok=True)
    _hunyuan_tokenizers(out / "tokenizers", cache)
    runpy.run_path(str(Path(__file__).resolve().parent / "engine_shim" / "sitecustomize.py"))
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, DTYPES[dtype_name])
    modules = hunyuan_modules(sd_scripts)
    paths = {}
    for i, (name, key) in enumerate((("dit", "transformer"), ("vae", "vae"), ("qwen", "qwen"), ("byt5", "byt5"))):
        sd = _random_state(modules.pop(name), dtype, seed + i)
        names = hunyuan_file_keys(name, sd)
        paths[key] = out / f"{name}.safetensors"
        save_file({n: v.contiguous() for n, v in zip(names, sd.values())}, str(paths[key]))
        del sd
    result = {k: str(v) for k, v in paths.items()} | {
        "tokenizers": str(out / "tokenizers"), "hf_cache": str(cache), "env": env, "double": double or 20,
        "single": single or 40, "qwen_layers": qwen_layers or 28, "qwen_vision": qwen_vision or 32}
    (out / "layout.json").write_text(json.dumps(result, indent=1), "utf-8")
    return result


def verify_hunyuan(sd_scripts: Path, layout_file: Path, forward: bool = True) -> dict:
    """Load a HunyuanImage-2.1 layout with sd-scripts' own loaders (strict), as ``hunyuan_image_train_network``
    does, tokenize a caption with its tokenize strategy and (``forward``) encode it and run one DiT step on
    the CPU. Run in a fresh process with ``layout.json``'s ``env``, HF_HUB_CACHE and the shim on PYTHONPATH
    (``engine_models.py verify-hunyuan`` sets them and re-executes itself)."""
    import torch

    layout = json.loads(layout_file.read_text("utf-8"))
    if str(sd_scripts) not in sys.path:
        sys.path.insert(0, str(sd_scripts))
    from library import hunyuan_image_models, hunyuan_image_text_encoder as te, hunyuan_image_vae
    from library.strategy_hunyuan_image import HunyuanImageTokenizeStrategy

    report: dict = {}
    tokens = HunyuanImageTokenizeStrategy(layout["tokenizers"]).tokenize(['ohwx, a photo with "Hello" on a sign'])
    report["tokens"] = [list(t.shape) for t in tokens]
    _, qwen = te.load_qwen2_5_vl(layout["qwen"], dtype=torch.bfloat16, device="cpu")
    report["qwen_layers"] = len(qwen.model.language_model.layers)
    _, byt5 = te.load_byt5(layout["byt5"], dtype=torch.float16, device="cpu")
    vae = hunyuan_image_vae.load_vae(layout["vae"], "cpu").to(torch.float32)   # training: fp16 on the GPU
    dit = hunyuan_image_models.load_hunyuan_image_model("cpu", layout["transformer"], "torch", False, "cpu",
                                                         torch.bfloat16)
    report["dit_blocks"] = [len(dit.double_blocks), len(dit.single_blocks)]
    if forward:   # what a training step does: encode the caption and a picture, one DiT prediction
        from library.strategy_hunyuan_image import HunyuanImageTextEncodingStrategy

        with torch.no_grad():
            conds = HunyuanImageTextEncodingStrategy().encode_tokens(None, [qwen, byt5], tokens)
            report["text_conds"] = [list(t.shape) for t in conds]
            del qwen, byt5
            latents = vae.encode(torch.zeros(1, 3, 64, 64)).sample()
            report["latents"] = list(latents.shape)
            vlm_embed, vlm_mask, byt5_embed, byt5_mask, _ = conds
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = dit(latents.to(torch.bfloat16), torch.tensor([500.0]), vlm_embed.to(torch.bfloat16), vlm_mask,
                           byt5_embed.to(torch.bfloat16), byt5_mask)
            report["prediction"] = list(pred.shape)
            report["prediction_finite"] = bool(torch.isfinite(pred.float()).all())
    report["ok"] = True
    return report


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
    h = sub.add_parser("hunyuan", help="HunyuanImage-2.1 files for sd-scripts (0 = full size)")
    h.add_argument("--sd-scripts", type=Path, required=True)
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--double", type=int, default=1)
    h.add_argument("--single", type=int, default=1)
    h.add_argument("--qwen-layers", type=int, default=2, help="at least 2: sd-scripts reads hidden_states[-3]")
    h.add_argument("--qwen-vision", type=int, default=1)
    h.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    v = sub.add_parser("verify-hunyuan", help="load a HunyuanImage-2.1 layout with sd-scripts' own loaders")
    v.add_argument("--sd-scripts", type=Path, required=True)
    v.add_argument("--layout", type=Path, required=True, help="the layout.json `hunyuan` wrote")
    v.add_argument("--no-forward", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "verify-hunyuan":
        import os

        layout = json.loads(args.layout.read_text("utf-8"))
        shim = str(Path(__file__).resolve().parent / "engine_shim")
        if os.environ.get("LORA_RUN_VERIFY_CHILD") != "1":   # a fresh interpreter with the shim and the cache
            import subprocess

            env = dict(os.environ, **layout["env"], HF_HUB_CACHE=layout["hf_cache"], HF_HUB_OFFLINE="1",
                       LORA_RUN_VERIFY_CHILD="1",
                       PYTHONPATH=os.pathsep.join([shim, *filter(None, [os.environ.get("PYTHONPATH")])]))
            return subprocess.run([sys.executable, *sys.argv], env=env).returncode
        print(json.dumps(verify_hunyuan(args.sd_scripts, args.layout, not args.no_forward)))
        return 0
    if args.what == "hunyuan":
        print(json.dumps(build_hunyuan(args.sd_scripts, args.out, args.double, args.single, args.qwen_layers,
                                       args.qwen_vision, args.dtype)))
    if args.what == "flux":
        print(json.dumps(build_flux(args.sd_scripts, args.out, args.double, args.single, args.t5_layers, args.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
