"""Batched generation: jobs of one strength, step count, guidance and size go through one pipeline call with one
starting latent and one prompt per image, whatever their prompts. Every family's batch gives the one-at-a-time
images (same seeds and prompts, same order), from prompts and from pre-encoded text; planted mistakes (a batch in
the wrong order, noise from the wrong seed, the prompts rotated by one inside the batch) are caught by the same
comparison; the grouping of jobs."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from .conftest import BASE_RECIPE

FAMILIES = ["flux.1-dev", "flux.2-klein", "flux.2-dev", "hunyuan-image-2.1", "hunyuan-dit-1.2"]
SEEDS = [3, 1, 2]
#: one prompt per seed for the mixed batches: a repeated prompt, and glyph text (quoted, HunyuanImage's ByT5 input)
#: in some rows only
PROMPTS = ['ohwx, a portrait "hi"', "a red car on a bridge at night, rain", 'ohwx, a portrait "hi"']
#: uint8 pixels: a batch may differ from batch 1 by kernel-level float differences (measured on CPU: at most 1)
TOLERANCE = 1
#: the latents the VAE decodes (float32, CPU): a batch differs from batch 1 by at most 2e-5 (Hunyuan-DiT; about 1e-6
#: elsewhere), where the prompts of ``PROMPTS`` swapped differ by 4e-3 (FLUX.2 [dev]) to 2 (Hunyuan-DiT). Two tiny
#: models barely hear their text (a prompt moves FLUX.2 [dev]'s pixels by 1 of 255, HunyuanImage's by 3), which
#: ``TOLERANCE`` cannot tell from float noise, so the prompt checks compare these latents too
LATENT_TOLERANCE = 1e-4

#: the native tests' tiny-model recipe on any family
RECIPE = BASE_RECIPE.replace('family = "flux.1-dev"', 'family = "{family}"').replace("{length}", "steps = 2")


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


def assert_same_images(batched, single) -> None:
    """The images of one batch equal the one-at-a-time images, in order, within ``TOLERANCE``."""
    a, b = _pixels(batched), _pixels(single)
    assert len(a) == len(b)
    for n, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape
        diff = int(np.abs(x - y).max())
        assert diff <= TOLERANCE, f"image {n}: batched differs from one-at-a-time by {diff}"


@pytest.fixture(scope="module")
def family_recipe(tmp_path_factory):
    from lora_run.recipe import load_recipe
    from lora_run_devtools.testing import build_tiny, make_images

    root = tmp_path_factory.mktemp("batch-gen")
    make_images(root / "subject", 1, size=(64, 64))
    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            model = build_tiny(family, root / family)
            path = root / f"{family}.toml"
            body = RECIPE.replace("{family}", family).replace("{model}", str(model))
            path.write_text(body.replace("{dataset}", str(root / "subject")), encoding="utf-8")
            made[family] = load_recipe(path).recipe
        return made[family]
    return get


@pytest.fixture(scope="module")
def pipelines(family_recipe):
    import torch

    from lora_run_native.adapters import adapter_class

    made: dict[str, tuple] = {}

    def get(family: str):
        if family not in made:
            recipe = family_recipe(family)
            adapter = adapter_class(family)(recipe, device=torch.device("cpu"))
            made[family] = (adapter, adapter.load_pipeline(torch.device("cpu"), torch.float32))
        return made[family]
    return get


def _call(adapter, pipe, seeds, guidance):
    import torch

    kw = dict(prompt='ohwx, a portrait "hi"', steps=2, guidance=guidance, width=64, height=64, lora_scale=1.0)
    with torch.no_grad():
        batched = adapter.generate_batch(pipe, seeds=seeds, **kw)
        single = [adapter.generate(pipe, seed=seed, **kw) for seed in seeds]
    return batched, single


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_gives_the_one_at_a_time_images(family, pipelines):
    adapter, pipe = pipelines(family)
    guidance = 4.0 if family == "hunyuan-dit-1.2" else 3.5        # Hunyuan-DiT: CFG on (negative batch too)
    batched, single = _call(adapter, pipe, SEEDS, guidance)
    assert len(batched) == len(SEEDS)
    assert_same_images(batched, single)
    pixels = _pixels(single)
    assert all(np.abs(pixels[0] - p).max() > 10 for p in pixels[1:]), "the seeds give different images"
    # planted mistakes the comparison must catch: the batch returned in the wrong order, noise from other seeds
    with pytest.raises(AssertionError, match="batched differs"):
        assert_same_images(batched[::-1], single)
    wrong_seed, _ = _call(adapter, pipe, [s + 10 for s in SEEDS], guidance)
    with pytest.raises(AssertionError, match="batched differs"):
        assert_same_images(wrong_seed, single)


def _guidance(family: str) -> float:
    return 4.0 if family == "hunyuan-dit-1.2" else 3.5        # Hunyuan-DiT: CFG on (negative batch too)


@contextlib.contextmanager
def decoded_latents(pipe):
    """The latents the pipeline's VAE decodes inside the block, one row per image, in the order of the calls."""
    rows: list = []
    real = pipe.vae.decode

    def decode(latents, *args, **kwargs):
        rows.extend(latents.detach().clone())
        return real(latents, *args, **kwargs)

    pipe.vae.decode = decode
    try:
        yield rows
    finally:
        del pipe.vae.decode          # the instance attribute: the class's method again


def assert_same_latents(batched, single) -> None:
    """The latents of one batch equal the one-at-a-time latents, in order, within ``LATENT_TOLERANCE``."""
    assert len(batched) == len(single)
    for n, (x, y) in enumerate(zip(batched, single)):
        diff = float((x - y).abs().max())
        assert diff <= LATENT_TOLERANCE, f"latent {n}: batched differs from one-at-a-time by {diff:.1e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_mixing_prompts_gives_each_image_alone(family, pipelines):
    """Evaluation groups mix prompts (one strength, several prompts × seeds): a list of per-seed prompts gives, per
    image, the image of its prompt and seed generated alone; the prompts rotated by one inside the batch do not."""
    import torch

    adapter, pipe = pipelines(family)
    kw = dict(steps=2, guidance=_guidance(family), width=64, height=64, lora_scale=1.0)
    with torch.no_grad(), decoded_latents(pipe) as latents:
        batched = adapter.generate_batch(pipe, prompt=PROMPTS, seeds=SEEDS, **kw)
        single = [adapter.generate(pipe, prompt=prompt, seed=seed, **kw) for prompt, seed in zip(PROMPTS, SEEDS)]
        # planted mistake: each seed paired with its neighbour's prompt inside the batch
        adapter.generate_batch(pipe, prompt=PROMPTS[1:] + PROMPTS[:1], seeds=SEEDS, **kw)
    assert len(batched) == len(SEEDS) and len(latents) == 3 * len(SEEDS)
    assert_same_images(batched, single)
    assert_same_latents(latents[:3], latents[3:6])
    with pytest.raises(AssertionError, match="batched differs"):
        assert_same_latents(latents[6:], latents[3:6])


def _encoded(family: str, adapter, pipe, prompts: list[str]) -> dict:
    """The prompts encoded by the family's pipeline, one row each, under the keys ``generate_batch`` takes as
    ``text`` (``encode_captions``' keys)."""
    import torch

    with torch.no_grad():
        if family == "flux.1-dev":
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                   max_sequence_length=adapter.max_sequence_length)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if family.startswith("flux.2"):
            def encode(texts):
                return pipe.encode_prompt(prompt=texts, max_sequence_length=adapter.max_sequence_length,
                                          text_encoder_out_layers=adapter.text_layers)[0]

            adapter.negative_text = {"prompt_embeds": encode([""])}      # CFG's empty prompt, without a reload
            return {"prompt_embeds": encode(prompts)}
        if family == "hunyuan-image-2.1":
            e, m, e2, m2 = pipe.encode_prompt(prompt=prompts, batch_size=len(prompts))
            return {"prompt_embeds": e, "prompt_embeds_mask": m, "prompt_embeds_2": e2, "prompt_embeds_mask_2": m2}
        out = {}
        for index, suffix in ((0, ""), (1, "_2")):
            e, _, m, _ = pipe.encode_prompt(prompts, device=torch.device("cpu"), dtype=torch.float32,
                                            do_classifier_free_guidance=False, text_encoder_index=index)
            out["prompt_embeds" + suffix], out["prompt_attention_mask" + suffix] = e, m
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_encoded_text_with_a_row_per_seed(family, pipelines):
    """Sample rounds during training stack the sample prompts' cached encodings, one row per seed: each image is
    the one generated alone from its own row (a batch of 1); the rows rotated by one are caught."""
    import torch

    from lora_run_native.adapters.base import text_row

    adapter, pipe = pipelines(family)
    text = _encoded(family, adapter, pipe, PROMPTS)
    assert all(v.shape[0] == len(PROMPTS) for v in text.values())
    rotated = {k: torch.cat([v[1:], v[:1]]) for k, v in text.items()}
    kw = dict(prompt=None, steps=2, guidance=_guidance(family), width=64, height=64, lora_scale=1.0)
    with torch.no_grad(), decoded_latents(pipe) as latents:
        batched = adapter.generate_batch(pipe, seeds=SEEDS, text=text, **kw)
        single = [adapter.generate(pipe, seed=seed, text=text_row(text, n, len(SEEDS)), **kw)
                  for n, seed in enumerate(SEEDS)]
        adapter.generate_batch(pipe, seeds=SEEDS, text=rotated, **kw)
    assert_same_images(batched, single)
    assert_same_latents(latents[:3], latents[3:6])
    with pytest.raises(AssertionError, match="batched differs"):
        assert_same_latents(latents[6:], latents[3:6])


def test_pre_encoded_text_is_batched_too(pipelines):
    """Samples during training pass pre-encoded prompts (batch 1); FluxPipeline does not repeat those itself."""
    import torch

    adapter, pipe = pipelines("flux.1-dev")
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt="ohwx, a portrait", prompt_2=None, max_sequence_length=16)
        text = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        kw = dict(prompt=None, steps=2, guidance=3.5, width=64, height=64, lora_scale=1.0, text=text)
        batched = adapter.generate_batch(pipe, seeds=SEEDS, **kw)
        single = [adapter.generate(pipe, seed=seed, **kw) for seed in SEEDS]
    assert_same_images(batched, single)
    with pytest.raises(AssertionError, match="batched differs"):
        assert_same_images(batched[1:] + batched[:1], single)


def test_seeded_noise_rows_are_the_seeds_alone():
    import torch

    from lora_run_native.adapters.base import seeded_noise

    rows = seeded_noise([5, 9, 5], (2, 3, 3))
    assert rows.shape == (3, 2, 3, 3)
    alone = torch.randn((1, 2, 3, 3), generator=torch.Generator("cpu").manual_seed(9))
    assert torch.equal(rows[1:2], alone)
    assert torch.equal(rows[0], rows[2]) and not torch.equal(rows[0], rows[1])


# ------------------------------------------------------------------------------------------ grouping
def _job(name, seed, prompt="p", strength=1.0, steps=2, guidance=3.5, width=64, height=64):
    return {"name": name, "prompt": prompt, "seed": seed, "strength": strength, "steps": steps,
            "guidance": guidance, "width": width, "height": height}


def test_jobs_of_one_strength_steps_guidance_and_size_share_a_call_whatever_their_prompt():
    from lora_run_native.generate import batch_groups

    jobs = [_job("a1", 1), _job("b1", 1, strength=0.5), _job("a2", 2, prompt="q"), _job("b2", 2, strength=0.5),
            _job("c1", 1, prompt="q"), _job("a3", 3, strength=1), _job("d1", 1, steps=3), _job("e1", 1, width=96),
            _job("f1", 1, guidance=4.0), _job("g1", 1, height=96), _job("h1", 1, prompt="r", strength=0.5)]
    # prompts p, q, p, q at strength 1 in one call; p, p, r at 0.5; any other steps, guidance or size alone
    assert batch_groups(jobs, lambda w, h: 8) == [[0, 2, 4, 5], [1, 3, 10], [6], [7], [8], [9]]
    # each group is cut to the limit of its image size, the order inside kept: 4 at a limit of 3 as 2 + 2 (one
    # batch size in two calls, as 3 + 1 takes); 3 at a limit of 2 as 2 + 1 (no equal cut in two calls)
    assert batch_groups(jobs, lambda w, h: 3) == [[0, 2], [4, 5], [1, 3, 10], [6], [7], [8], [9]]
    assert batch_groups(jobs, lambda w, h: 2) == [[0, 2], [4, 5], [1, 3], [10], [6], [7], [8], [9]]
    sizes = []
    batch_groups(jobs, lambda w, h: sizes.append((w, h)) or 1)
    assert (96, 64) in sizes and (64, 96) in sizes
    assert batch_groups([], lambda w, h: 4) == []


@pytest.mark.parametrize("count,limit,runs", [
    (16, 8, [8, 8]), (15, 8, [8, 7]), (14, 8, [7, 7]), (9, 8, [8, 1]), (12, 5, [4, 4, 4]), (11, 5, [5, 5, 1]),
    (3, 8, [3]), (8, 8, [8]), (5, 1, [1, 1, 1, 1, 1])])
def test_a_group_is_cut_in_equal_runs_only_where_that_drops_a_batch_size(count, limit, runs):
    """Equal runs where they give one batch size in as many calls as the plain cut (one CUDA-graph recording
    fewer: 14 at 8 as 7 + 7); else runs of the limit and a shorter last one (9 at 8 as 8 + 1: 5 + 4 would keep
    two sizes)."""
    from lora_run_native.generate import batch_groups

    groups = batch_groups([_job(f"j{n}", n, prompt=f"p{n % 3}") for n in range(count)], lambda w, h: limit)
    assert [len(g) for g in groups] == runs
    assert [n for g in groups for n in g] == list(range(count))


def test_the_evaluation_grid_batches_across_prompts():
    """The shipped fast recipe's grid (5 prompts × 4 strengths × 3 seeds at 512², 8 a call): two calls per
    strength (8 + 7, the prompts mixed, in the grid's order) where batching by prompt made five calls of 3."""
    from lora_run_eval.evaluator import grid_jobs
    from lora_run_native.generate import batch_groups, max_batch

    class Recipe:
        class eval:
            prompts = [f"photo {n} of {{trigger}}" for n in range(5)]
            strengths, seeds, steps, guidance, width, height = [0.5, 0.8, 1.0, 1.2], [1, 2, 3], 20, 3.5, 512, 512

        class dataset:
            trigger = "ohwx"

    jobs = grid_jobs(Recipe)
    groups = batch_groups(jobs, max_batch)
    assert [len(g) for g in groups] == [8, 7] * 4
    for n, strength in enumerate([0.5, 0.8, 1.0, 1.2]):
        members = groups[2 * n] + groups[2 * n + 1]
        assert {jobs[i]["strength"] for i in members} == {strength}
        assert [(jobs[i]["prompt_index"], jobs[i]["seed"]) for i in members] == [
            (p, seed) for p in range(5) for seed in (1, 2, 3)]
    assert len({jobs[i]["prompt"] for i in groups[0]}) == 3      # p0 × 3 seeds, p1 × 3, p2 × 2


def test_the_batch_limit_follows_the_image_size():
    from lora_run_native.generate import BATCH_PIXELS, max_batch

    assert max_batch(512, 512) == BATCH_PIXELS // 512 ** 2 == 8
    assert max_batch(1024, 1024) == 2
    assert max_batch(4096, 4096) == 1
    assert max_batch(512, 512, "group-offload") == 1


def test_generate_images_keeps_order_names_and_images(family_recipe, tmp_path, monkeypatch):
    """The evaluation's entry point: a grid (prompts × strengths × seeds) in batches gives the files and the
    order that one job at a time gives, with the same pixels; a batch returned reversed is caught."""
    from PIL import Image

    from lora_run_native import generate

    recipe = family_recipe("flux.1-dev")
    jobs = [_job(f"p{p}-s{s:g}-seed{seed}", seed, prompt=PROMPTS[p], strength=s)
            for p in range(2) for s in (0.5, 1.0) for seed in (1, 2, 3)]
    calls = []
    real = generate.batch_groups
    monkeypatch.setattr(generate, "batch_groups", lambda jobs, limit: calls.append(real(jobs, limit)) or calls[-1])
    told = []       # `on_image`: each job once its file is written, in the order the calls make them

    def on_image(job):
        told.append((job["name"], Path(job["path"]).is_file()))
    done = generate.generate_images(recipe, None, jobs, tmp_path / "batched", device="cpu", on_image=on_image)
    assert told == [(jobs[n]["name"], True) for group in calls[0] for n in group]
    assert [len(g) for g in calls[0]] == [6, 6]         # one call per strength, both prompts in it
    assert all({jobs[n]["prompt"] for n in group} == set(PROMPTS[:2]) for group in calls[0])
    assert [r["name"] for r in done] == [j["name"] for j in jobs]
    assert [Path(r["path"]).name for r in done] == [f"{j['name']}.png" for j in jobs]
    assert all(r["seed"] == j["seed"] for r, j in zip(done, jobs))
    # each image carries its call's time, shared by the call's images: the calls' sum, without the load
    shares = [[done[n]["seconds"] for n in group] for group in calls[0]]
    assert all(len(set(share)) == 1 and share[0] > 0 for share in shares), shares
    monkeypatch.setattr(generate, "batch_groups", lambda jobs, limit: [[n] for n in range(len(jobs))])
    single = generate.generate_images(recipe, None, jobs, tmp_path / "single", device="cpu")
    images = [Image.open(r["path"]) for r in done]
    singles = [Image.open(r["path"]) for r in single]
    assert_same_images(images, singles)

    # planted mistakes: an adapter whose batch comes back reversed; one that pairs each seed with its neighbour's
    # prompt (rotated by one inside the call)
    from lora_run_flux.adapter import FluxAdapter

    monkeypatch.setattr(generate, "batch_groups", real)
    right = FluxAdapter.generate_batch
    monkeypatch.setattr(FluxAdapter, "generate_batch", lambda self, pipe, **kw: right(self, pipe, **kw)[::-1])
    wrong = generate.generate_images(recipe, None, jobs, tmp_path / "wrong", device="cpu")
    with pytest.raises(AssertionError, match="batched differs"):
        assert_same_images([Image.open(r["path"]) for r in wrong], singles)

    def rotated(self, pipe, *, prompt, **kw):
        return right(self, pipe, prompt=list(prompt[1:]) + list(prompt[:1]), **kw)

    monkeypatch.setattr(FluxAdapter, "generate_batch", rotated)
    wrong = generate.generate_images(recipe, None, jobs, tmp_path / "rotated", device="cpu")
    with pytest.raises(AssertionError, match="batched differs"):
        assert_same_images([Image.open(r["path"]) for r in wrong], singles)


def test_an_adapter_with_only_generate_falls_back_to_one_call_per_seed():
    """A third-party adapter that implements only ``generate``: one call per seed, with that seed's prompt and its
    row of pre-encoded text (a batch of 1)."""
    import torch

    from lora_run_native.adapters.base import ModelAdapter

    class OneByOne(ModelAdapter):
        def __init__(self):
            self.calls = []

        def generate(self, pipe, *, prompt, seed, text=None, **kw):
            self.calls.append((prompt, seed, None if text is None else {k: v.tolist() for k, v in text.items()}))
            return f"image {seed}"

    adapter = OneByOne()
    kw = dict(steps=1, guidance=1.0, width=8, height=8, lora_scale=1.0)
    out = adapter.generate_batch(None, prompt="p", seeds=[4, 2], **kw)
    assert out == ["image 4", "image 2"] and adapter.calls == [("p", 4, None), ("p", 2, None)]
    adapter.calls.clear()
    adapter.generate_batch(None, prompt=["p", "q", "p"], seeds=[4, 2, 7], **kw)
    assert adapter.calls == [("p", 4, None), ("q", 2, None), ("p", 7, None)]
    adapter.calls.clear()
    text = {"embeds": torch.tensor([[1.0], [2.0]]), "pooled": torch.tensor([[9.0]])}     # rows per seed, and shared
    adapter.generate_batch(None, prompt=None, seeds=[4, 2], text=text, **kw)
    assert adapter.calls == [(None, 4, {"embeds": [[1.0]], "pooled": [[9.0]]}),
                             (None, 2, {"embeds": [[2.0]], "pooled": [[9.0]]})]
    with pytest.raises(ValueError, match="2 prompts for 3 seeds"):
        adapter.generate_batch(None, prompt=["p", "q"], seeds=[4, 2, 7], **kw)
    with pytest.raises(ValueError, match="'embeds' has 2 rows for 3 seeds"):
        adapter.generate_batch(None, prompt=None, seeds=[4, 2, 7], text=text, **kw)

    class Neither(ModelAdapter):
        def __init__(self):
            pass

    with pytest.raises(NotImplementedError, match="neither generate nor generate_batch"):
        Neither().generate(None, prompt="p", seed=1, steps=1, guidance=1.0, width=8, height=8, lora_scale=1.0)


def test_prompts_and_text_rows_for_a_pipeline():
    """One prompt shared by every seed goes to the pipeline once with ``num_images_per_prompt`` = the seeds (as
    before); per-seed prompts that differ go as a list, one image each. Text of batch 1 is repeated."""
    import torch

    from lora_run_native.adapters.base import pipeline_prompt, text_rows

    assert pipeline_prompt("p", [1, 2, 3]) == ("p", 3)
    assert pipeline_prompt(["p", "p"], [1, 2]) == ("p", 2)
    assert pipeline_prompt(["p", "q", "p"], [1, 2, 3]) == (["p", "q", "p"], 1)
    assert pipeline_prompt(None, [1, 2]) == (None, 2)
    rows = text_rows({"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0], [4.0]])}, 2)
    assert rows["a"].tolist() == [[1.0, 2.0], [1.0, 2.0]] and rows["a"].is_contiguous()
    assert rows["b"].tolist() == [[3.0], [4.0]]
