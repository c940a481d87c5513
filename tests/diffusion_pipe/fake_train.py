"""A stand-in for diffusion-pipe's train.py (tests only; copied as `train.py` into a temporary git checkout).

It takes diffusion-pipe's command line, reads the main and dataset TOML with the `toml` package when it is
installed (as diffusion-pipe does; `tomllib` otherwise), applies diffusion-pipe's checks and defaults that
matter to lora-run (alpha refused, a save cadence required, captions-less images skipped by default, the
cache written into each dataset directory, runs named by UTC timestamp), prints DeepSpeed-style progress
lines and saves LoRAs in diffusion-pipe's real key layouts (FLUX: diffusers keys in
`pytorch_lora_weights.safetensors`; HunyuanImage: ComfyUI keys in `adapter_model.safetensors`), with tiny
tensors. It honours `--resume_from_checkpoint` and the `save_quit` signal file.

Its console output is the real diffusion-pipe's, read from the GPU recording in
fixtures/diffusion-pipe-8f83dbf/gpu-h200-20261202/ (commit 8f83dbf, one H200, 2026-12-02): the start-up and
caching lines are printed as recorded, and each step prints the recorded DeepSpeed `step=…, lr=[…]` and
`steps: N loss: …` lines with this run's numbers put in. Only the save line (`Saving model to directory …`),
`Started new epoch`, `Resuming training from checkpoint` and `TRAINING COMPLETE!` are still written from
diffusion-pipe's code: the GPU run went NaN before its first save.

FAKE_DP_MODE picks a behaviour: ok | crash | hang | garbage | nan | quiet_exit | slow_cache | replay |
no_final_save (TRAINING COMPLETE! without the end-of-training save), and for the saves from step FAKE_DP_AT on:
lora_truncated | lora_empty | lora_nan | lora_rank (twice the rank) | lora_family (another family's keys) |
partial_crash (cut off, then exit 1).
FAKE_DP_AT: the step at which crash/hang/nan happen (default 3). FAKE_DP_STEP_DELAY: seconds per step.
FAKE_DP_AWAIT_QUIT_AT: at the start of that step, wait (at most 60 s) for the `save_quit` file: a Ctrl-C that comes
during the step. FAKE_DP_EXIT_DELAY: seconds between `TRAINING COMPLETE!` and the exit (the real train.py took seconds to end after
it, the time in which a late Ctrl-C reached lora-run on the GPU). FAKE_DP_OUTPUT_LAG: print the lines of each training
step only that many steps later (the rest at the end), so that the save folders appear before lora-run has read their
step's lines, as on the GPU (0.06 s a step).
FAKE_DP_BLOCKS: "double,single" block counts (default "2,2"); FAKE_DP_HIDDEN: hidden size (default 8).
`replay` prints train.py's part of a recorded train.log (FAKE_DP_REPLAY names the fixture file) and then
behaves as the recorded process did: waits to be stopped after a non-finite loss, else exits with 1.
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

MEDIA_SKIP = {".txt", ".npz", ".json", ".parquet", ".bak", ".db"}
MODEL_TYPES = {"flux", "hunyuan_image", "sdxl", "wan", "hunyuan-video", "chroma", "qwen_image"}


def load_toml(path):
    try:
        import toml
    except ImportError:
        import tomllib

        with open(path, "rb") as fh:
            return tomllib.load(fh)
    with open(path) as fh:
        return toml.load(fh)


def log(msg):
    print(msg, flush=True)


try:
    RECORDED_DIR  # noqa: B018 - set in the line the fake_checkout fixture puts above this file
except NameError:
    RECORDED_DIR = str(Path(__file__).resolve().parent / "fixtures" / "diffusion-pipe-8f83dbf" / "gpu-h200-20261202")
RUN = "<run>/diffusion-pipe/data/subject"     # the staged set's path in the recording


def recorded(name="flux_fp8_train_nan.log"):
    return (Path(RECORDED_DIR) / name).read_text("utf-8").splitlines()


def train_py_lines(lines):
    """train.py's own output in a recorded train.log: after the launcher's `spawned` line, without lora-run's
    lines and the launcher's closing lines."""
    start = next(i for i, line in enumerate(lines) if "launch.py:272:main] process" in line) + 1
    return [line for line in lines[start:] if not line.startswith(("[lora-run]", "=== "))
            and "[launch.py:" not in line]


def startup_lines(dataset_path):
    """The recorded start-up: DeepSpeed init, pipeline loading, metadata, caching, engine set-up (to the
    optimizer line), with the recorded data folder replaced by this run's."""
    lines = train_py_lines(recorded())
    end = next(i for i, line in enumerate(lines) if "DeepSpeed Final Optimizer" in line) + 1
    return [line.replace(RUN, dataset_path) for line in lines[:end]]


def _stamp():
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


def lr_line(step, lr):
    """DeepSpeed's per-step line as recorded (`[…] [INFO] [logging.py:123:log_dist] [Rank 0] step=1, skipped=0,
    lr=[7.500000000000001e-05], mom=[(0.9, 0.999)]`), with this step's numbers."""
    line = next(x for x in recorded() if "[Rank 0] step=1, skipped=0" in x)
    line = re.sub(r"^\[[^\]]+\]", f"[{_stamp()}]", line)
    return re.sub(r"step=1, skipped=0, lr=\[[^\]]*\]", f"step={step}, skipped=0, lr=[{lr}]", line)


def loss_line(step, loss, seconds, samples_per_s):
    """diffusion-pipe's loss line as recorded (`steps: 1 loss: 1.5028 iter time (s): 1.240 samples/sec: 0.806`)."""
    line = next(x for x in recorded() if x.startswith("steps: 1 loss: "))
    return re.sub(r"steps: 1 loss: \S+ iter time \(s\): \S+ samples/sec: \S+",
                  f"steps: {step} loss: {loss:0.4f} iter time (s): {seconds:0.3f} samples/sec: {samples_per_s:0.3f}",
                  line)


def replay(name):
    """Print train.py's part of a recorded train.log; after a non-finite loss wait to be stopped (as the real
    process trained on), else exit with 1 as the recorded process did."""
    for line in train_py_lines(recorded(name)):
        log(line)
        if re.match(r"steps: \d+ loss: (nan|inf|-inf) ", line):
            time.sleep(120)
            return 3
    return 1


def lora_tensors(model_type, rank, seed):
    import numpy as np

    double, single = (int(x) for x in os.environ.get("FAKE_DP_BLOCKS", "2,2").split(","))
    h = int(os.environ.get("FAKE_DP_HIDDEN", "8"))
    mlp = 4 * h
    rng = np.random.default_rng(seed)

    def pair(out_f, in_f):
        return (rng.standard_normal((rank, in_f)).astype(np.float16),
                (rng.standard_normal((out_f, rank)) * 0.1).astype(np.float16))

    tensors = {}
    if model_type == "flux":
        shapes_d = {"attn.to_q": (h, h), "attn.to_k": (h, h), "attn.to_v": (h, h), "attn.to_out.0": (h, h),
                    "attn.add_q_proj": (h, h), "attn.add_k_proj": (h, h), "attn.add_v_proj": (h, h),
                    "attn.to_add_out": (h, h), "ff.net.0.proj": (mlp, h), "ff.net.2": (h, mlp),
                    "ff_context.net.0.proj": (mlp, h), "ff_context.net.2": (h, mlp), "norm1.linear": (6 * h, h),
                    "norm1_context.linear": (6 * h, h)}
        shapes_s = {"attn.to_q": (h, h), "attn.to_k": (h, h), "attn.to_v": (h, h), "norm.linear": (3 * h, h),
                    "proj_mlp": (mlp, h), "proj_out": (h, h + mlp)}
        for kind, count, shapes in (("transformer_blocks", double, shapes_d),
                                    ("single_transformer_blocks", single, shapes_s)):
            for i in range(count):
                for name, (o, n) in shapes.items():
                    a, b = pair(o, n)
                    tensors[f"transformer.{kind}.{i}.{name}.lora_A.weight"] = a
                    tensors[f"transformer.{kind}.{i}.{name}.lora_B.weight"] = b
    else:
        shapes_d = {"img_attn.qkv": (3 * h, h), "img_attn.proj": (h, h), "img_mlp.0": (mlp, h), "img_mlp.2": (h, mlp),
                    "img_mod.lin": (6 * h, h)}
        shapes_d.update({k.replace("img_", "txt_"): v for k, v in shapes_d.items()})
        shapes_s = {"linear1": (3 * h + mlp, h), "linear2": (h, h + mlp), "modulation.lin": (3 * h, h)}
        for kind, count, shapes in (("double_blocks", double, shapes_d), ("single_blocks", single, shapes_s)):
            for i in range(count):
                for name, (o, n) in shapes.items():
                    a, b = pair(o, n)
                    tensors[f"diffusion_model.{kind}.{i}.{name}.lora_A.weight"] = a
                    tensors[f"diffusion_model.{kind}.{i}.{name}.lora_B.weight"] = b
    return tensors


class LaggingOutput:
    """The training loop's lines, printed `lag` steps after the step that printed them (FAKE_DP_OUTPUT_LAG)."""

    def __init__(self, lag):
        self.lag, self.held = lag, []

    def line(self, step, text):
        self.held.append((step, text))
        while self.held and self.held[0][0] <= step - self.lag:
            log(self.held.pop(0)[1])

    def flush(self):
        for _step, text in self.held:
            log(text)
        self.held = []


def save_model(run_dir, name, config, config_path, step, out):
    from safetensors.numpy import save_file

    out.line(step, f"Saving model to directory {name}")
    save_dir = run_dir / name
    tmp = save_dir / "tmp"
    os.makedirs(tmp, exist_ok=False)
    model_type = config["model"]["type"]
    mode = os.environ.get("FAKE_DP_MODE", "ok") if step >= int(os.environ.get("FAKE_DP_AT", "3")) else "ok"
    rank = config["adapter"]["rank"] * (2 if mode == "lora_rank" else 1)     # a LoRA of another rank
    tensors = lora_tensors(model_type, rank, seed=step)
    if mode == "lora_nan":
        import numpy as np

        tensors = {k: np.full_like(v, np.nan) if "lora_B" in k else v for k, v in tensors.items()}
    if mode == "lora_family":          # an SDXL U-Net LoRA's keys: another family's file
        tensors = {re.sub(r"^(transformer|diffusion_model)\.", "unet.down_blocks.", k): v for k, v in tensors.items()}
    if model_type == "flux":
        file = save_dir / "pytorch_lora_weights.safetensors"
        save_file(tensors, str(file))
    else:
        (save_dir / "adapter_config.json").write_text(json.dumps({"r": config["adapter"]["rank"],
                                                                   "lora_alpha": config["adapter"]["rank"]}))
        file = save_dir / "adapter_model.safetensors"
        save_file(tensors, str(file), metadata={"format": "pt"})
    if mode in ("lora_truncated", "partial_crash"):      # cut off while written
        with open(file, "r+b") as fh:
            fh.truncate(file.stat().st_size // 2)
        if mode == "partial_crash":
            raise SystemExit("killed while saving the LoRA")
    if mode == "lora_empty":
        file.write_bytes(b"")
    shutil.copy(config_path, save_dir)
    shutil.rmtree(tmp)


def save_checkpoint(run_dir, step, epoch):
    tag = f"global_step{step}"
    (run_dir / tag).mkdir(exist_ok=True)
    (run_dir / tag / "state.json").write_text(json.dumps({"step": step, "epoch": epoch}))
    (run_dir / "latest").write_text(tag)


def scan_directory(entry, dataset_cfg, model_type):
    path = Path(entry["path"])
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory {path} does not exist")
    skip_empty = entry.get("skip_empty_caption", dataset_cfg.get("skip_empty_caption", True))
    kept = []
    for f in sorted(path.iterdir()):
        if f.is_dir() or f.suffix.lower() in MEDIA_SKIP:
            continue
        caption_file = f.with_suffix(".txt")
        caption = caption_file.read_text() if caption_file.exists() else ""
        if not caption.strip() and skip_empty:
            log(f"WARNING: skipping {f} because it has no caption")
            continue
        kept.append((f, caption))
    cache = path / "cache" / model_type
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "metadata.json").write_text(json.dumps([[str(f), c] for f, c in kept]))
    return len(kept) * entry.get("num_repeats", dataset_cfg.get("num_repeats", 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--resume_from_checkpoint", nargs="?", const=True, default=None)
    parser.add_argument("--regenerate_cache", action="store_true", default=None)
    parser.add_argument("--cache_only", action="store_true", default=None)
    parser.add_argument("--trust_cache", action="store_true", default=None)
    parser.add_argument("--i_know_what_i_am_doing", action="store_true", default=None)
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("--deepspeed", action="store_true")
    parser.add_argument("--deepspeed_config", default=None)
    args = parser.parse_args()
    if not args.deepspeed:
        raise SystemExit("train.py: launch with `deepspeed ... train.py --deepspeed --config ...`")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = rank == 0
    mode = os.environ.get("FAKE_DP_MODE", "ok")
    if mode == "replay":
        if any(line.startswith("steps: ") for line in recorded(os.environ["FAKE_DP_REPLAY"])):  # it reached training
            config = load_toml(args.config)
            run_dir = Path(config["output_dir"]) / datetime.now(timezone.utc).strftime("%Y%m%d_%H-%M-%S")
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.config, run_dir)
            shutil.copy(config["dataset"], run_dir)
        return replay(os.environ["FAKE_DP_REPLAY"])
    at = int(os.environ.get("FAKE_DP_AT", "3"))
    delay = float(os.environ.get("FAKE_DP_STEP_DELAY", "0"))

    config = json.loads(json.dumps(load_toml(args.config)))
    if not any(k in config for k in ("save_every_n_epochs", "save_every_n_steps", "save_every_n_examples")):
        raise AssertionError("one of save_every_n_epochs/steps/examples is required")
    adapter = config["adapter"]
    if "alpha" in adapter:
        raise NotImplementedError("This script forces alpha=rank to make the saved LoRA format simpler and more "
                                  "predictable with downstream inference programs. Please remove alpha from the config.")
    model_type = config["model"]["type"]
    if model_type not in MODEL_TYPES:
        raise NotImplementedError(f"Model type {model_type} is not implemented")
    stages = config.get("pipeline_stages", 1)
    if world % stages:
        raise AssertionError(f"num_gpus {world} must be divisible by pipeline_stages {stages}")
    if config.get("blocks_to_swap") and stages != 1:
        raise AssertionError("Block swapping only works with pipeline_stages=1")
    dataset_cfg = load_toml(config["dataset"])
    examples = 0
    for entry in dataset_cfg["directory"]:
        examples += scan_directory(entry, dataset_cfg, model_type)
    if main_process:
        # the start-up and caching output of the real diffusion-pipe 8f83dbf on a GPU, as recorded
        for line in startup_lines(dataset_cfg["directory"][0]["path"]):
            log(line)
        if mode == "slow_cache":
            time.sleep(delay * 20)

    output_dir = Path(config["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    resume = args.resume_from_checkpoint if args.resume_from_checkpoint is not None else \
        config.get("resume_from_checkpoint", False)
    if resume is True:
        run_dir = sorted(p for p in output_dir.iterdir() if p.is_dir())[-1]
    elif resume:
        run_dir = output_dir / resume
        if not run_dir.exists():
            raise ValueError(f"Checkpoint directory {run_dir} does not exist")
    else:
        run_dir = output_dir / datetime.now(timezone.utc).strftime("%Y%m%d_%H-%M-%S")
        if main_process:
            run_dir.mkdir(exist_ok=True)
            shutil.copy(args.config, run_dir)
            shutil.copy(config["dataset"], run_dir)
    if not main_process:
        return 0

    mbs = config.get("micro_batch_size_per_gpu", 1)
    gas = config.get("gradient_accumulation_steps", 1)
    global_batch = mbs * gas * (world // stages)
    steps_per_epoch = examples // global_batch
    if steps_per_epoch == 0:
        raise RuntimeError("ConcatenatedBatchedDataset is empty")
    epochs = config["epochs"]
    max_steps = config.get("max_steps")
    warmup = config.get("warmup_steps", 0)
    lr0 = config["optimizer"].get("lr", 1e-4)
    step, epoch = 1, 1
    if resume:
        state = json.loads((run_dir / (run_dir / "latest").read_text().strip() / "state.json").read_text())
        step, epoch = state["step"] + 1, state["epoch"]
        log(f"Resuming training from checkpoint. Resuming at epoch: {epoch}, step: {step}")
    saved = checkpointed = False
    final_name = None
    out = LaggingOutput(int(os.environ.get("FAKE_DP_OUTPUT_LAG", "0")))
    await_quit_at = int(os.environ.get("FAKE_DP_AWAIT_QUIT_AT", "0"))
    while True:
        if delay:
            time.sleep(delay)
        if mode == "crash" and step == at:
            out.flush()
            log("Traceback (most recent call last):")
            log('  File "train.py", line 612, in <module>')
            log("    loss = model_engine.train_batch(iterator).item()")
            log("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
            return 1
        if mode == "hang" and step == at:
            out.flush()
            time.sleep(3600)
        if step == await_quit_at:
            out.flush()
            waited = time.monotonic()
            while not (run_dir / "save_quit").is_file() and time.monotonic() - waited < 60:
                time.sleep(0.05)
        if mode == "garbage":
            sys.stdout.buffer.write(b"\xff\xfe garbage \x00\x01 " + os.urandom(16).replace(b"\n", b"") + b"\n")
            sys.stdout.buffer.write(b"Training:  10%|#         | 1/10 [00:01<00:09]\r" * 3 + b"\n")
            sys.stdout.buffer.write(b"x" * 40000 + b"\n")
            sys.stdout.flush()
        lr = lr0 * min(1.0, step / warmup) if warmup else lr0
        out.line(step, lr_line(step, lr))
        loss = float("nan") if (mode == "nan" and step >= at) else 0.5 / (1 + 0.1 * step)
        out.line(step, loss_line(step, loss, 0.012, global_batch / 0.012))
        saved = checkpointed = False
        if step % steps_per_epoch == 0:             # diffusion-pipe's Saver.process_epoch
            if config.get("checkpoint_every_n_epochs") and epoch % config["checkpoint_every_n_epochs"] == 0:
                save_checkpoint(run_dir, step, epoch + 1)
                checkpointed = True
            if config.get("save_every_n_epochs") and epoch % config["save_every_n_epochs"] == 0:
                save_model(run_dir, f"epoch{epoch}", config, args.config, step, out)
                saved = True
            epoch += 1
            if epoch > epochs:
                final_name = f"epoch{epoch - 1}"
                break
            out.line(step, f"Started new epoch: {epoch}")
        quit_now = (run_dir / "save_quit").is_file()          # Saver.process_step: the signal file is consumed,
        if quit_now:                                          # the step's LoRA saved, then a checkpoint, then exit
            os.remove(run_dir / "save_quit")
        if config.get("save_every_n_steps") and step % config["save_every_n_steps"] == 0:
            save_model(run_dir, f"step{step}", config, args.config, step, out)
            saved = True
        if quit_now:
            save_checkpoint(run_dir, step, epoch)
            out.line(step, "Manually quitting")
            out.flush()
            return 0
        if max_steps and step >= max_steps:
            final_name = f"step{step}"
            break
        step += 1
    out.flush()
    if mode == "quiet_exit":
        return 0
    if not checkpointed:
        save_checkpoint(run_dir, step, epoch)
    if not saved and mode != "no_final_save":
        save_model(run_dir, final_name, config, args.config, step, out)
        out.flush()
    log("TRAINING COMPLETE!")
    time.sleep(float(os.environ.get("FAKE_DP_EXIT_DELAY", "0")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
