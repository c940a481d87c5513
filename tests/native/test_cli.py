"""The backend as users meet it: registration, capabilities, check/plan without torch, shipped recipes, demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_native_and_flux_are_registered_with_capabilities():
    from lora_run.plugins import load_plugins

    plugins = load_plugins()
    native, flux = plugins.registry["backend"]["native"], plugins.registry["backend"]["flux"]
    assert native.factory is flux.factory and native.options is flux.options
    assert "flux.1-dev" in native.capabilities and set(flux.capabilities) == {"flux.1-dev"}
    assert flux.description == "alias of native for FLUX.1-dev"
    caps = native.capabilities["flux.1-dev"]
    for feature in ("noise_offset", "guidance", "text_encoder_training", "fp8", "regularization_weight",
                    "timestep_sampling:flux-shift", "targets:all-linear", "optimizer:prodigy", "loss:*"):
        assert feature in caps
    assert "min_snr_gamma" not in caps
    assert callable(native.generate) and plugins.registry["command"]["demo"].plugin == "native"


def test_min_snr_gamma_is_refused_with_the_reason(flux_recipe, run_cli):
    result = run_cli("check", flux_recipe(), "--set", "train.min_snr_gamma=5.0")
    assert result.returncode == 2
    assert "[train.min_snr_gamma]" in result.stderr and "flow matching" in result.stderr


def test_flux_alias_trains_only_flux(flux_recipe, run_cli):
    result = run_cli("check", flux_recipe(), "--set", "backend.name=\"flux\"", "--set",
                     "model.family=\"hunyuan-dit-1.2\"")
    assert result.returncode == 2 and "[model.family]" in result.stderr


def test_check_and_plan_never_import_torch(flux_recipe, tmp_path):
    code = ("import sys, io, contextlib\nfrom lora_run.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            f"    a = main(['check', {str(flux_recipe())!r}])\n"
            f"    b = main(['plan', {str(flux_recipe())!r}, '--json'])\n"
            "assert (a, b) == (0, 0), (a, b, out.getvalue())\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]



def test_an_install_without_the_train_extra_is_named_before_anything_is_written(flux_recipe, tmp_path):
    """`pip install lora-run` without `[train]`: `check` passed, and the run and the demo crashed with "No module named
    'torch'" (exit 1) after writing the run folder or half the demo. Each now names the missing packages and the
    install line (exit 2) and writes nothing. Packages are hidden the way Python sees a package that is not
    installed (``sys.modules[name] = None``: find_spec gives None, import raises)."""
    recipe = flux_recipe()
    runs = {"check": ["check", str(recipe)], "run": [str(recipe), "--output-dir", str(tmp_path / "run")],
            "demo": ["demo", "--output-dir", str(tmp_path / "demo")]}
    for name, argv in runs.items():
        code = ("import sys\nfor hidden in ('peft', 'diffusers'):\n    sys.modules[hidden] = None\n"
                f"from lora_run.cli import main\nsys.exit(main({argv!r}))\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2 and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert ("trains with diffusers, peft, not installed here: pip install 'lora-run[train]'"
                in result.stderr), (name, result.stderr[-2000:])
        if name == "check":
            assert "[backend.name]" in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()


@pytest.mark.parametrize("version,old", [("0.30.0", True), ("99.0.0", False)])
def test_an_install_with_a_train_package_too_old_is_named_before_anything_is_written(version, old, flux_recipe,
                                                                                       tmp_path):
    """pip keeps an installed release an older lora-run accepted (and `--no-deps` ignores the bounds): a diffusers
    older than the `train` extra asks for failed deep in an import, "unexpected ImportError … a bug in lora-run" (exit
    1). `check`, the run and the demo name it with the upgrade line (exit 2) and write nothing. The old release is a
    real distribution record first on the path (what `importlib.metadata` reads); the control's new one passes."""
    shadow = tmp_path / "shadow" / f"diffusers-{version}.dist-info"
    shadow.mkdir(parents=True)
    (shadow / "METADATA").write_text(f"Metadata-Version: 2.1\nName: diffusers\nVersion: {version}\n", encoding="utf-8")
    path = os.pathsep.join(p for p in (str(shadow.parent), os.environ.get("PYTHONPATH")) if p)
    recipe = flux_recipe()
    runs = {"check": ["check", str(recipe)], "run": [str(recipe), "--output-dir", str(tmp_path / "run")],
            "demo": ["demo", "--output-dir", str(tmp_path / "demo")]}
    for name, argv in runs.items() if old else [("check", runs["check"])]:
        result = subprocess.run([sys.executable, "-m", "lora_run", *argv], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})
        said = f"needs newer diffusers {version} (lora-run asks for >=0.37): pip install -U 'lora-run[train]'"
        assert (result.returncode, said in result.stderr) == ((2, True) if old else (0, False)), (
            name, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and (not old or name != "check" or "[backend.name]" in result.stderr)
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()


def test_plan_reports_steps_buckets_memory_and_outputs(flux_recipe, run_cli):
    result = run_cli("plan", flux_recipe(length="epochs = 3"), "--json", "--set", "dataset.repeats=2")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert plan["backend"] == "native" and plan["steps"] == 3 * 3 * 2
    assert plan["details"]["buckets"] == {"64x64": 3}       # area ≤ resolution² = 64²: 96×80 photos → 64×64
    assert plan["memory_estimate_gib"] > 0
    assert plan["outputs"][0].endswith("tiny.safetensors") and plan["outputs"][1].endswith("diffusers/tiny.safetensors")


def test_memory_estimate_follows_the_recipe():
    from lora_run.recipe import load_recipe, replace
    from lora_run_native.memory import estimate_memory_gib

    fast = load_recipe(REPO / "recipes" / "flux" / "identity-fast.toml").recipe
    bf16 = replace(fast, model={"base_precision": "bf16"})
    # under memory_mode = "auto" the plan decides the base precision: the recipe's fp8 is a memory setting
    # that a GPU with room does not need, so it does not change the estimate; in memory mode it is used
    assert 12 < estimate_memory_gib(fast) == estimate_memory_gib(bf16) < 40
    assert estimate_memory_gib(replace(fast, train={"memory_mode": "memory"})) < estimate_memory_gib(fast)
    # on CUDA with mixed precision the memory mode decides checkpointing/offload (perfmodel.py)
    modes = {m: estimate_memory_gib(replace(bf16, train={"memory_mode": m})) for m in ("speed", "memory", "low-vram")}
    assert modes["low-vram"] < 12 < modes["memory"] <= 24 < modes["speed"]
    # without mixed precision (the CPU path) gradient checkpointing still decides
    fp32 = replace(bf16, train={"mixed_precision": "no"})
    no_gc = replace(fp32, train={"gradient_checkpointing": False})
    assert estimate_memory_gib(no_gc) > estimate_memory_gib(fp32)


@pytest.mark.parametrize("name", ["identity-fast.toml", "identity-hifi.toml"])
def test_shipped_flux_recipes(name, run_cli, tmp_path, monkeypatch, reachable_hub):
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import validate
    from lora_run_devtools.testing import make_images

    path = REPO / "recipes" / "flux" / name
    text = path.read_text()
    assert text.startswith("# ") and "Command:" in text and "lora-run" in text
    recipe = load_recipe(path).recipe
    assert recipe.backend.name == "native" and recipe.model.family == "flux.1-dev"
    assert recipe.optimizer.name == "adafactor" and recipe.optimizer.lr == 1e-4
    assert recipe.model.base_precision == "fp8" and recipe.train.gradient_checkpointing
    assert recipe.train.seed == 42 and recipe.train.timestep_sampling == "sigmoid"
    if name == "identity-fast.toml":
        assert (recipe.lora.rank, recipe.lora.alpha, recipe.train.steps, recipe.train.noise_offset) == (32, 32.0, 1500, 0.05)
        assert (recipe.dataset.resolution, recipe.dataset.bucket_min, recipe.dataset.bucket_max) == (512, 256, 768)
        assert (recipe.scheduler.name, recipe.scheduler.warmup_steps) == ("constant_with_warmup", 100)
    else:
        assert (recipe.lora.rank, recipe.lora.alpha, recipe.lora.dropout, recipe.train.steps) == (64, 64.0, 0.1, 2500)
        assert (recipe.dataset.resolution, recipe.dataset.bucket_min, recipe.dataset.bucket_max) == (768, 384, 1024)
        assert (recipe.scheduler.name, recipe.scheduler.warmup_steps) == ("cosine", 500)
        assert recipe.train.noise_offset == 0.1 and recipe.train.loss == "pseudo-huber"
        assert recipe.train.min_snr_gamma is None and recipe.dataset.regularization
        assert "min_snr_gamma" in text and "does\n#   not apply to flow matching" in text
    monkeypatch.delenv("HF_HUB_OFFLINE")           # check/plan never download; they only ask whether the hub answers
    loaded = load_recipe(path)
    validate(loaded, load_plugins())            # every feature it uses is honoured by the native backend
    photos = tmp_path / "photos"
    make_images(photos, count=3, size=(320, 288))
    result = run_cli("plan", path, "--set", f"dataset.path=\"{photos}\"", "--set", "dataset.regularization=[]",
                     "--json", env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": reachable_hub})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["plan"]["steps"] == recipe.train.steps


@pytest.mark.slow
def test_demo_runs_from_the_cli(run_cli, tmp_path):
    result = run_cli("demo", "--output-dir", tmp_path / "demo", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "demo" / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert (run / "tiny-flux-demo.safetensors").is_file() and (run / "diffusers" / "tiny-flux-demo.safetensors").is_file()
    assert list((run / "checkpoints").iterdir()) and list((run / "samples").rglob("*.png"))
    assert manifest["duration_s"] < 120
    assert "not a useful LoRA" in result.stdout
    assert list((run / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs through accelerate"
    assert manifest["artifacts"]["cache"]["latents"]["misses"] == 12 + 20      # subject and regularisation images
    assert "0 error(s), 0 warning(s)" in result.stdout       # our own demo raises none of the playbook's warnings
    # nor the libraries' own: transformers 5 without torchvision warned twice while the demo built its model, telling a
    # first-time user to install torchvision (which, beside the README's CPU torch, pulls a multi-GB CUDA torch)
    assert "[transformers]" not in result.stdout + result.stderr and "torchvision" not in result.stdout + result.stderr


def test_demo_run_again_says_how_to_replace_it(run_cli, tmp_path):
    earlier = tmp_path / "demo" / "run"
    earlier.mkdir(parents=True)
    (earlier / "manifest.json").write_text("{}")
    (tmp_path / "demo" / ".lora-run-demo").write_text("")        # what an earlier demo leaves
    result = run_cli("demo", "--output-dir", tmp_path / "demo")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lora-run demo --overwrite" in result.stderr and "--resume" not in result.stderr
    assert not (tmp_path / "demo" / "assets").exists()       # refused before building anything
    assert (earlier / "manifest.json").read_text() == "{}"


def test_demo_never_writes_into_a_folder_it_did_not_make(run_cli, tmp_path):
    """A file, or a folder of the user's own files, as --output-dir: exit 2 naming it, nothing written."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    result = run_cli("demo", "--output-dir", a_file)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "notes.txt: exists and is not a folder" in result.stderr and a_file.read_text() == "mine"

    photos = tmp_path / "photos"
    (photos / "assets").mkdir(parents=True)
    (photos / "assets" / "recipe.toml").write_text("# my own recipe\n")
    result = run_cli("demo", "--output-dir", photos)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "did not write" in result.stderr
    assert sorted(p.name for p in photos.rglob("*")) == ["assets", "recipe.toml"]
    assert (photos / "assets" / "recipe.toml").read_text() == "# my own recipe\n"

    # the demo's mark (or its recipe) as a link to a user's file: it marked the folder as the demo's, and the mark
    # was written through it (the user's file replaced by the demo's line), the folder used
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("my thesis")
    for name in (".lora-run-demo", "assets/recipe.toml"):
        folder = tmp_path / f"linked-{name.replace('/', '-')}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(thesis)
        (folder / "notes.txt").write_text("mine")
        result = run_cli("demo", "--output-dir", folder)
        assert result.returncode == 2 and "did not write" in result.stderr, result.stderr[-2000:]
        assert thesis.read_text() == "my thesis" and (folder / name).is_symlink()
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == sorted(
            {name, "notes.txt", *([str(Path(name).parent)] if "/" in name else [])})


def test_the_demo_never_deletes_a_changed_model_or_dataset_folder_to_build_it_anew(tmp_path, capsys):
    """`lora-run demo` rebuilt its dataset when `data/subject` or `data/reg` was missing, and its model when
    `model_index.json` was, by deleting the whole folder first: a user who had removed the regularisation drawings and
    kept notes (or photos of their own) in `assets/data` lost them. The demo never leaves either folder incomplete
    (it builds into a temporary folder and renames it), so one that is short of its parts is refused, named, exit 2,
    nothing deleted; the control: with the folder moved away it is built anew."""
    from lora_run.cli import main
    from lora_run_native import demo

    out = tmp_path / "demo"
    demo.build_demo(out / "assets")
    data = out / "assets" / "data"
    for png in (data / "reg").iterdir():
        png.unlink()
    (data / "reg").rmdir()
    (data / "notes.txt").write_text("mine")
    (data / "subject" / "my-photo.png").write_bytes(b"mine")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    code = main(["demo", "--output-dir", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}: is not the demo's dataset" in err and "Traceback" not in err, err
    after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert set(after) - set(before) <= {".lora-run-demo"} and set(before) <= set(after), "nothing deleted"   # its mark
    assert (data / "notes.txt").read_text() == "mine"
    data.rename(tmp_path / "kept")
    demo.build_demo(out / "assets")
    assert len(list((data / "reg").glob("*.png"))) == 20 and (tmp_path / "kept" / "notes.txt").is_file()


def test_a_demo_interrupted_while_building_leaves_nothing_half_built(tmp_path, monkeypatch):
    """Ctrl-C while `lora-run demo` built its model left a folder with model_index.json and missing weights,
    which every later `lora-run demo` reused (and failed on); the model and dataset now appear whole or not at all."""
    import lora_run_flux.tiny as tiny
    from lora_run_native import demo

    real = tiny.build_tiny_flux

    def interrupted(folder, seed=0):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model_index.json").write_text("{}")     # diffusers writes this first
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "build_tiny_flux", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo(tmp_path / "assets")
    assert not (tmp_path / "assets" / "tiny-flux").exists()
    monkeypatch.setattr(tiny, "build_tiny_flux", real)
    demo.build_demo(tmp_path / "assets")
    assert (tmp_path / "assets" / "tiny-flux" / "transformer").is_dir()
    assert len(list((tmp_path / "assets" / "data" / "subject").glob("*.png"))) == 12
    assert [p.name for p in (tmp_path / "assets").iterdir() if p.name.startswith(".")] == []
