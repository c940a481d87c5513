"""The training loop on the tiny FLUX model: learning, NaN stop, Ctrl-C, checkpoints, options."""
from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest

from lora_run.errors import TrainingInterrupted
from lora_run.hookspecs import hookimpl
from lora_run_training import NonFiniteLoss

from .conftest import lora_tensors


class Losses:
    def __init__(self):
        self.values = []

    @hookimpl
    def step_finished(self, step, metrics):
        self.values.append(metrics["loss"])


@pytest.mark.slow
def test_loss_falls_when_overfitting_a_handful_of_images(flux_recipe, run_recipe, tmp_path):
    """Same seed ⇒ the same batches, noise and σ at every step; a run with a (practically) zero learning rate
    is the paired baseline, so the comparison is not at the mercy of σ-noise."""
    recipe = flux_recipe()
    sets = ["train.steps=60", "lora.rank=8", "lora.alpha=8.0", "train.timestep_sampling=\"sigmoid\""]
    trained, frozen = Losses(), Losses()
    run_recipe(recipe, [*sets, "optimizer.lr=1e-2"], [trained], output=tmp_path / "trained")
    run_recipe(recipe, [*sets, "optimizer.lr=1e-12"], [frozen], output=tmp_path / "frozen")
    assert len(trained.values) == len(frozen.values) == 60
    assert trained.values[0] == pytest.approx(frozen.values[0], rel=1e-4), "paired: identical first step"
    last_trained = sum(trained.values[-15:]) / 15
    last_frozen = sum(frozen.values[-15:]) / 15
    assert last_trained < 0.85 * last_frozen, (last_trained, last_frozen)


class NaNLoss:
    @hookimpl
    def register_losses(self, register):
        import torch

        def factory(_options=None):
            def loss(prediction, target, step=0, **_info):
                per_sample = ((prediction - target) ** 2).flatten(1).mean(1)
                return per_sample * (float("nan") if step >= 3 else 1.0)
            return loss
        register("nan-after-3", factory)


def _with_loss(plugins, name):
    """The native backend honours the losses its capabilities list; a test loss is added to them."""
    import attrs

    native = plugins.registry["backend"]["native"]
    caps = {f: frozenset(v | {f"loss:{name}"}) for f, v in native.capabilities.items()}
    plugins.registry["backend"]["native"] = attrs.evolve(native, capabilities=caps)
    return plugins


@pytest.mark.parametrize("every, kept", [(2, "step-000002"), (3, "step-000003"), (5, None)])
def test_nan_loss_stops_with_playbook_advice_and_keeps_the_last_checkpoint(flux_recipe, run_recipe, tmp_path, every,
                                                                           kept):
    """A step's loss is read while the next step runs, so a NaN at step 4 may be seen one step later; nothing of
    it may be written meanwhile. Step 4 writes a checkpoint itself (every 2), the next write is two steps later
    (every 3: the NaN is seen at step 5, which writes nothing), or step 5 writes one (every 5: its loss must be
    read before that checkpoint is written)."""
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute

    plugins = _with_loss(load_plugins(extra=[NaNLoss()]), "nan-after-3")
    loaded = load_recipe(flux_recipe(), ["train.steps=8", f"train.save_every_steps={every}",
                                         "train.loss=\"nan-after-3\""])
    with pytest.raises(NonFiniteLoss) as info:
        execute(loaded, plugins, output_dir=str(tmp_path / "run"), echo=lambda *_: None)
    message = str(info.value)
    assert "step 4" in message and "lower the learning rate" in message and "bf16" in message
    run = tmp_path / "run"
    written = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
    assert written == ([kept] if kept else []), written
    assert (kept or "no checkpoint had been saved yet") in message
    if kept:
        assert (run / "checkpoints" / kept / "resume" / "state.json").is_file()
    assert not list(run.glob("*.safetensors")), "no LoRA is written after a NaN"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed"


class Order:
    """Records when each step's loss is computed (its forward) and when the step is reported finished."""

    def __init__(self):
        self.events, self.lrs = [], []

    @hookimpl
    def register_losses(self, register):
        def factory(_options=None):
            def loss(prediction, target, step=0, **_info):
                self.events.append(f"L{step}")
                return ((prediction - target) ** 2).flatten(1).mean(1)
            return loss
        register("ordered", factory)

    @hookimpl
    def step_finished(self, step, metrics):
        self.events.append(f"F{step}")
        self.lrs.append(metrics["lr"])
        self.metrics = metrics


def test_a_steps_loss_is_read_once_the_next_step_is_queued_except_where_it_writes(flux_recipe, tmp_path):
    """One process: step N is reported (its loss read, which waits for its kernels) after step N+1's forward and
    backward are queued, so the GPU has work while the host reads; a step that writes (the checkpoint at 3, the
    last step) is reported before anything is written. The old order, L0 F1 L1 F2 …, read every loss at once."""
    from lora_run.plugins import load_plugins

    order = Order()
    plugins = _with_loss(load_plugins(extra=[order]), "ordered")
    from lora_run.recipe import load_recipe
    from lora_run.run import execute

    loaded = load_recipe(flux_recipe(), ["train.steps=6", "train.save_every_steps=3", "train.loss=\"ordered\"",
                                         "scheduler.name=\"linear\"", "scheduler.warmup_steps=4"])
    ctx = execute(loaded, plugins, output_dir=str(tmp_path / "run"), echo=lambda *_: None)
    assert order.events == ["L0", "L1", "F1", "L2", "F2", "F3", "L3", "L4", "F4", "L5", "F5", "F6"], order.events
    # each step reports the learning rate after its own scheduler step (warmup: 1/4, 2/4, 3/4 and 4/4 of 1e-3,
    # then the linear decay to the end), not the next step's, which is queued before it is reported
    expected = [1e-3 * n / 4 for n in (1, 2, 3, 4)] + [1e-3 * (6 - n) / 2 for n in (5, 6)]
    assert order.lrs == pytest.approx(expected, rel=1e-6), order.lrs
    assert ctx.artifacts["steps"] == 6 and len(ctx.artifacts["timing"]["step_s_between_rounds"]) >= 1
    # the metrics are those docs/hooks/step_finished.md names (it named `mem_gib`, on CUDA only; the key is
    # `memory_gib`, on every device)
    page = (Path(__file__).resolve().parents[2] / "docs" / "hooks" / "step_finished.md").read_text("utf-8")
    documented = set(re.findall(r"`(\w+)`", page.split("the native backend adds", 1)[1].split(". ", 1)[0]))
    assert set(order.metrics) == documented | {"loss"}, (sorted(order.metrics), sorted(documented))
    assert order.metrics["memory_gib"] > 0 and order.metrics["epoch"] >= 0


class InterruptAt:
    def __init__(self, step):
        self.step = step

    @hookimpl
    def step_finished(self, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_resumable_state(flux_recipe, run_recipe, tmp_path):
    recipe = flux_recipe()
    with pytest.raises(TrainingInterrupted) as info:
        run_recipe(recipe, ["train.steps=6"], [InterruptAt(3)])
    assert "--resume" in str(info.value)
    run = tmp_path / "run"
    # step_finished(3) runs once step 4 is queued (a step's loss is read while the next one runs): the stop is
    # honoured at the end of the step in progress, 4, as for a Ctrl-C at any other moment
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000004"]
    assert (run / "checkpoints" / "step-000004" / "resume" / "state.json").is_file()
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    ctx = run_recipe(recipe, ["train.steps=6"], resume=True)
    assert ctx.artifacts["steps"] == 6 and os.path.isfile(ctx.artifacts["lora_kohya"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_checkpoints_keep_last_and_carry_lora_files(flux_recipe, run_recipe, tmp_path):
    ctx = run_recipe(flux_recipe(), ["train.steps=7", "train.save_every_steps=2", "train.keep_last=2"])
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000006"]
    step6 = root / "step-000006"
    for name in ("resume/state.json", "resume/trainable.safetensors", "resume/optimizer.safetensors",
                 "resume/rng.safetensors", "tiny-step000006.safetensors", "diffusers/tiny-step000006.safetensors"):
        assert (step6 / name).is_file(), name
    assert sorted(p.name for p in step6.glob("*.safetensors")) == ["tiny-step000006.safetensors"], \
        "the only top-level weights file is the LoRA (what evaluators pick up)"
    state = json.loads((step6 / "resume" / "state.json").read_text())
    assert state["step"] == 6 and state["total_steps"] == 7
    recorded = ctx.artifacts["checkpoints"]
    assert [c["step"] for c in recorded] == [4, 6]
    assert all(os.path.isfile(c["lora_kohya"]) and os.path.isfile(c["lora_diffusers"]) for c in recorded)
    timing = ctx.artifacts["timing"]     # the steady step of each stretch between the checkpoints at 2, 4 and 6
    assert len(timing["step_s_between_rounds"]) == 4 and all(x > 0 for x in timing["step_s_between_rounds"]), timing


def test_epochs_regularisation_accumulation_dropout_and_samples(flux_recipe, run_recipe, tmp_path):
    from lora_run_devtools.testing import make_images

    reg = tmp_path / "reg"
    make_images(reg, count=2, size=(80, 80), trigger="", seed=3, prefix="reg")
    extra = f"""
[[dataset.regularization]]
path = "{reg}"
weight = 0.5
"""
    recipe = flux_recipe(extra, length="epochs = 2")
    events = []

    class Watch:
        @hookimpl
        def samples_written(self, step, paths):
            events.append((step, list(paths)))

    ctx = run_recipe(recipe, ["train.batch_size=2", "train.gradient_accumulation=2",
                              "dataset.caption_dropout=0.5", "sample.prompts=[\"a photo of {trigger}\"]",
                              "sample.every_steps=1", "sample.steps=2", "sample.width=64", "sample.height=64",
                              "sample.strengths=[0.0, 1.0]", "train.save_every_epochs=1"], [Watch()])
    # 3 subject + 2 reg images, two buckets (96x80 subject, 80x80 reg) at batch 2 -> 3 batches an epoch;
    # 2 epochs = 6 batches = 3 optimizer steps of 2 accumulated batches
    assert ctx.artifacts["steps"] == 3
    assert events and events[-1][0] == 3 and len(events[-1][1]) == 2
    for _, paths in events:
        for p in paths:
            assert os.path.isfile(p) and p.endswith(".png")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"], "epoch 1 ends in step 2"


def test_a_sample_round_batches_the_prompts_and_keeps_each_image_its_own(flux_recipe, run_recipe, tmp_path,
                                                                           monkeypatch):
    """A sample round generates the images of one strength in one pipeline call across the sample prompts (their
    cached encodings stacked, one row per image); every file is the image of its prompt, seed and strength
    generated alone with the same weights, and the files keep their names and order. A prompt's images written
    under the other prompt's names fail the same comparison (planted)."""
    import numpy as np
    import torch
    from PIL import Image

    from lora_run_native.train import Trainer

    from .test_batch_generation import assert_same_images

    seeds, strengths = [1, 2], [0.5, 1.0]
    rounds = []
    real = Trainer._samples

    def checked(self, state, number):
        adapter, prompts = state.adapter, self.sample_prompts()
        right = type(adapter).generate_batch
        calls = []

        def spy(pipe, **kw):        # which prompt's cached encoding each row of the call is
            rows = kw["text"]["prompt_embeds"]
            calls.append((kw["lora_scale"], list(kw["seeds"]),
                          [next(n for n, p in enumerate(prompts) if torch.equal(row, state.texts[p]["prompt_embeds"]))
                           for row in rows]))
            return right(adapter, pipe, **kw)

        adapter.generate_batch = spy
        try:
            written = real(self, state, number)
        finally:
            del adapter.generate_batch
        alone, was_training, rng = {}, state.transformer.training, torch.get_rng_state()
        pipe = adapter.sampling_pipeline(state.transformer)
        state.transformer.eval()
        try:
            with torch.no_grad():
                for n, prompt in enumerate(prompts):
                    text = {k: v[None] for k, v in state.texts[prompt].items()}
                    for seed in seeds:
                        for strength in strengths:
                            alone[n, seed, strength] = adapter.generate(
                                pipe, prompt=None, seed=seed, steps=2, guidance=3.5, width=64, height=64,
                                lora_scale=strength, text=text)
        finally:
            torch.set_rng_state(rng)
            state.transformer.train(was_training)
        rounds.append((number, written, alone, calls))
        return written

    monkeypatch.setattr(Trainer, "_samples", checked)
    run_recipe(flux_recipe(), ["train.steps=2", 'sample.prompts=["a photo of {trigger}", "a red car at night, rain"]',
                               "sample.every_steps=2", "sample.steps=2", "sample.width=64", "sample.height=64",
                               f"sample.seeds={seeds}", f"sample.strengths={strengths}"])
    assert rounds
    for number, written, alone, calls in rounds:
        keys = [(n, seed, strength) for n in range(2) for seed in seeds for strength in strengths]
        assert [Path(p).name for p in written] == [f"p{n:02d}-seed{seed}-x{strength:g}.png" for n, seed, strength in keys]
        assert all(Path(p).parent.name == f"step-{number:06d}" for p in written)
        # one call per strength, both prompts in it, each row the encoding of its image's prompt
        assert calls == [(strength, [1, 2, 1, 2], [0, 0, 1, 1]) for strength in strengths]
        files = [Image.open(p) for p in written]
        assert_same_images(files, [alone[key] for key in keys])
        first, second = np.asarray(files[0], dtype=np.int16), np.asarray(files[4], dtype=np.int16)
        assert int(np.abs(first - second).max()) > 10, "the two prompts give different images"
        swapped = files[4:] + files[:4]          # planted: each prompt's images under the other prompt's names
        with pytest.raises(AssertionError, match="batched differs"):
            assert_same_images(swapped, [alone[key] for key in keys])


def test_text_encoder_lora_is_trained_then_frozen(flux_recipe, run_recipe, tmp_path):
    ctx = run_recipe(flux_recipe(), ["train.steps=4", "text_encoder.train=true", "text_encoder.train_fraction=0.5",
                                     "text_encoder.lr_ratio=0.5", "optimizer.lr=1e-2"])
    kohya = lora_tensors(ctx.artifacts["lora_kohya"])
    diffusers = lora_tensors(ctx.artifacts["lora_diffusers"])
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B") for k in diffusers)
    te_up = [v for k, v in diffusers.items() if k.startswith("text_encoder.") and ".lora_B." in k]
    assert any(float(v.abs().sum()) > 0 for v in te_up), "the text-encoder LoRA moved in its first half"


def test_fp8_base_weights_train(flux_recipe, run_recipe):
    ctx = run_recipe(flux_recipe(), ["train.steps=2", "model.base_precision=\"fp8\"", "train.gradient_checkpointing=true",
                                     "sample.prompts=[\"a photo of {trigger}\"]", "sample.every_steps=1", "sample.steps=2",
                                     "sample.width=64", "sample.height=64"])
    assert len(ctx.artifacts["samples"]) == 2
    up = [v for k, v in lora_tensors(ctx.artifacts["lora_diffusers"]).items() if ".lora_B." in k]
    assert up and all(math.isfinite(float(v.abs().sum())) for v in up)
    assert any(float(v.abs().sum()) > 0 for v in up)


@pytest.mark.parametrize("optimizer,scheduler", [("adafactor", "cosine"), ("adamw", "linear")])
def test_optimizers_and_schedules(flux_recipe, run_recipe, optimizer, scheduler):
    ctx = run_recipe(flux_recipe(), ["train.steps=3", f"optimizer.name=\"{optimizer}\"", f"scheduler.name=\"{scheduler}\"",
                                     "scheduler.warmup_steps=1", "train.loss=\"pseudo-huber\"",
                                     "train.timestep_weighting=\"cosmap\"", "train.noise_offset=0.1",
                                     "train.timestep_sampling=\"flux-shift\"", "lora.dropout=0.1"])
    assert os.path.isfile(ctx.artifacts["lora_kohya"])


def test_missing_optional_optimizer_package_is_a_clear_error(flux_recipe, run_cli):
    import importlib.util

    if importlib.util.find_spec("prodigyopt") is not None:
        pytest.skip("prodigyopt is installed")
    result = run_cli("check", flux_recipe(), "--set", "optimizer.name=\"prodigy\"")
    assert result.returncode == 2
    assert "[optimizer.name]" in result.stderr and "prodigyopt" in result.stderr


def test_encoders_out_of_memory_under_the_runs_cap_name_the_cap(flux_recipe, run_recipe, tmp_path, monkeypatch):
    """`[train] gpu_memory_gib` too small for the autoencoder and text encoders: caching runs out of GPU memory before
    any training. That was reported as a crash (exit 1, "OutOfMemoryError"); it is the recipe's cap, so it is bad input
    (exit 2) naming the key, and nothing was trained. Control: the same error without a cap stays a crash."""
    import torch

    from lora_run.errors import BackendError, RecipeError
    from lora_run_native import train

    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB")

    monkeypatch.setattr(train.Trainer, "build_caches", out_of_memory)
    recipe = flux_recipe()
    with pytest.raises(RecipeError, match=r"\[train\.gpu_memory_gib\] = 0\.5 GiB: caching the dataset .* nothing was "
                                          r"trained") as caught:
        run_recipe(recipe, ["train.gpu_memory_gib=0.5"], output=tmp_path / "capped")
    assert caught.value.exit_code == 2
    with pytest.raises(BackendError, match="OutOfMemoryError"):
        run_recipe(recipe, [], output=tmp_path / "uncapped")
