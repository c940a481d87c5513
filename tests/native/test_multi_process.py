"""Several processes through the real launchers, on CPU with gloo: `torchrun`, `accelerate launch`, two
"nodes" on one machine, and `lora-run --gpus N` (torch.distributed.run's Python entry). Checked: the same
LoRA as one process with the same global batch, rank 0 alone writes, resume with another number of
processes, FSDP2 of the frozen base, an agreed stop on Ctrl-C, a failed rank ending the run.

Every launch runs in its own session with a timeout and is killed with its whole process group afterwards,
so no process outlives a test."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_run.errors import RecipeError

from .conftest import lora_tensors

# 5 images, global batch 2: every epoch ends with a 1-sample batch, so rank 1 gets an empty slice there.
COMMON = ["train.save_every_steps=2", "train.keep_last=10", "dataset.caption_dropout=0.3", "train.noise_offset=0.1",
          "optimizer.lr=1e-2", "optimizer.eps=1e-4", "train.timestep_sampling=\"flux-shift\""]
ONE = ["train.batch_size=2", *COMMON]           # one process, global batch 2
TWO = ["train.batch_size=1", *COMMON]           # per process; × 2 processes = global batch 2
# Measured on CPU (tiny FLUX, lr 1e-2): ≤ 1e-6 of the tensor's largest value with Adam ε = 1e-4. With the
# default ε = 1e-8 it is ~1e-4: Adam's g / (|g| + ε) turns float32 round-off in gradients near ε (averages of
# the ranks' gradients that nearly cancel) into visible differences, so the tests raise ε to compare updates.
REL = 1e-5
BIN = Path(sys.executable).parent
TIMEOUT = 300


def assert_close(a_path, b_path):
    """Every tensor of ``b`` equals ``a`` within float32 round-off relative to the tensor's largest value."""
    a, b = lora_tensors(a_path), lora_tensors(b_path)
    assert a.keys() == b.keys() and a
    worst = 0.0
    for k in a:
        scale = float(a[k].abs().max()) or 1.0
        worst = max(worst, float((a[k] - b[k]).abs().max()) / scale)
    assert worst < REL, f"max abs difference {worst:.2e} × the tensor's largest value"
    changed = max(float(a[k].abs().max()) for k in a if "lora_up" in k or "lora_B" in k)
    assert changed > 1e-3, "the LoRA did not train: the comparison would be empty"
    return worst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = Path(__file__).resolve().parent / "mp_probe"      # its sitecustomize instruments launched processes


def env() -> dict:
    paths = [str(PROBE), *(str(Path(__file__).resolve().parents[2] / d) for d in ("core", "plugins"))]
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
            "HOME": os.environ.get("HOME", "/tmp")}


def start(argv: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    fh = open(log, "wb")
    return subprocess.Popen(argv, env={**env(), **extra_env}, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)       # whatever is left of its process group
        except ProcessLookupError:
            pass
        proc.wait()
    return code, log.read_text("utf-8", "replace")


def launch(argv: list[str], log: Path, timeout: float = TIMEOUT, **extra_env: str) -> tuple[int, str]:
    return finish(start(argv, log, **extra_env), log, timeout)


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def lora_run_args(recipe: Path, out: Path, values: list[str], *extra: str) -> list[str]:
    return ["-m", "lora_run", str(recipe), "--output-dir", str(out), *sets(values), *extra]


@pytest.fixture
def five_images(tmp_path):
    from lora_run_devtools.testing import make_images

    folder = tmp_path / "five"
    make_images(folder, count=5, size=(96, 80))
    return folder


def only_rank_0_wrote(run: Path, checkpoints: list[int], steps: int) -> dict:
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in checkpoints]
    log = (run / "run.log").read_text()
    assert log.count("LoRA written") == 1 and log.count(f"step {steps}/{steps}") == 1
    for s in checkpoints:
        assert log.count(f"checkpoint step-{s:06d}") == 1
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["processes"]["world_size"] == 2 and manifest["processes"]["backend"] == "gloo"
    assert manifest["artifacts"]["lora_kohya"] == str(run / "tiny.safetensors")
    return manifest


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.mark.slow
def test_torchrun_equals_one_process_and_resumes_with_another_process_count(flux_recipe, run_recipe, five_images,
                                                                             tmp_path):
    """Global batch 4 = 1 process × batch 2 × accumulation 2 = 2 processes × batch 1 × accumulation 2."""
    recipe = flux_recipe(data=five_images)
    accum = ["train.gradient_accumulation=2"]
    one = run_recipe(recipe, [*ONE, *accum, "train.steps=4"], output=tmp_path / "one")
    two = tmp_path / "two"
    code, text = launch([str(BIN / "torchrun"), "--nproc-per-node=2", "--master-addr=127.0.0.1",
                         f"--master-port={free_port()}",
                         *lora_run_args(recipe, two, [*TWO, *accum, "train.steps=4"])], tmp_path / "two.log")
    assert code == 0, text
    worst = assert_close(one.artifacts["lora_kohya"], two / "tiny.safetensors")
    print(f"torchrun 2 processes vs 1: worst difference {worst:.2e} of the tensor's largest value")
    assert_close(one.artifacts["lora_diffusers"], two / "diffusers" / "tiny.safetensors")
    only_rank_0_wrote(two, [2], 4)
    assert text.count("done: ") == 1                 # rank 0 reports, the other rank is silent
    # planted mistake: half the global batch (one process, batch 1) is not the same training
    half = run_recipe(recipe, ["train.batch_size=1", *COMMON, *accum, "train.steps=4"], output=tmp_path / "half")
    with pytest.raises(AssertionError):
        assert_close(half.artifacts["lora_kohya"], two / "tiny.safetensors")

    # the run cut after step 3 by 2 processes (checkpoint at 2), resumed by ONE process with batch 2
    cut = tmp_path / "cut"
    code, text = launch([sys.executable, *lora_run_args(recipe, cut, [*TWO, *accum, "train.steps=3"], "--gpus", "2")],
                        tmp_path / "cut.log")
    assert code == 0, text
    resumed = run_recipe(recipe, [*ONE, *accum, "train.steps=4"], output=cut, resume=True)
    assert (cut / "run.log").read_text().count("resumed from step-000002") == 1
    assert_close(one.artifacts["lora_kohya"], resumed.artifacts["lora_kohya"])


# ------------------------------------------------------------------------------- what each rank trains
def probed(folder: Path) -> dict[int, list[dict]]:
    """The records of ``mp_probe`` (LORA_RUN_PROBE=folder): rank → one dict per micro-step."""
    return {int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(folder.glob("rank*.jsonl"))}


@pytest.fixture
def three_buckets(tmp_path):
    """6 images in 3 buckets at resolution 96 (3 wide, 2 tall, 1 square): with a global batch of 2 every epoch has
    full and short batches of different shapes."""
    from lora_run_devtools.testing import make_images

    folder = tmp_path / "mixed"
    make_images(folder, count=3, size=(96, 80), prefix="wide")
    make_images(folder, count=2, size=(80, 96), prefix="tall", seed=1)
    make_images(folder, count=1, size=(96, 96), prefix="square", seed=2)
    return folder


@pytest.mark.slow
def test_each_rank_trains_its_own_share_of_every_global_batch_across_buckets(flux_recipe, three_buckets, tmp_path):
    """2 processes × batch 1 against 1 process × batch 2, 2 epochs over 3 buckets (`epochs`: the step count comes
    from the global batch). Every step the ranks train disjoint parts of the one-process batch, in one bucket; each
    image once per epoch; the step's loss and the LoRA are the one-process ones; torch's own generator (LoRA
    dropout) runs one stream per rank, rank 0's the one-process stream; DDP's gradients live in its buckets. Planted
    mistake: DDP summing the ranks' gradients instead of averaging them is caught by the LoRA comparison."""
    recipe = flux_recipe(data=three_buckets, length="epochs = 2")
    common = ["dataset.resolution=96", "optimizer.lr=1e-2", "optimizer.eps=1e-4"]
    runs = {}
    for name, argv, values in (
            ("one", [sys.executable], ["train.batch_size=2"]),
            ("two", [str(BIN / "torchrun"), "--nproc-per-node=2", "--master-addr=127.0.0.1",
                     f"--master-port={free_port()}"], ["train.batch_size=1"])):
        (tmp_path / f"probe-{name}").mkdir()
        code, text = launch([*argv, *lora_run_args(recipe, tmp_path / name, [*common, *values])],
                            tmp_path / f"{name}.log", LORA_RUN_PROBE=str(tmp_path / f"probe-{name}"))
        assert code == 0, text
        runs[name] = probed(tmp_path / f"probe-{name}")
    one, two = runs["one"][0], runs["two"]
    assert [r["step"] for r in one] == list(range(8)), "2 epochs × 4 global batches (3 buckets: 2 + 1 + 1)"
    assert {tuple(r["shape"]) for r in one} == {(16, 10, 12), (16, 12, 10), (16, 12, 12)}
    assert len(two[0]) == len(two[1]) == len(one)
    seen: list[int] = []
    for ref, r0, r1 in zip(one, two[0], two[1]):
        assert r0["step"] == r1["step"] == ref["step"]
        assert r0["shape"] == r1["shape"] == ref["shape"], "the ranks of a step train one bucket"
        trained = [i for r in (r0, r1) if r["scale"] for i in r["items"]]
        assert trained == ref["items"], "the ranks' slices are the one-process batch, disjoint, nothing dropped"
        assert r0["global"] == r1["global"] == len(ref["items"])
        seen += trained
        assert r0["rng"] == ref["rng"], "rank 0 keeps the one-process generator stream"
        assert r1["rng"] != r0["rng"], "rank 1 draws its own LoRA-dropout masks"
    assert sorted(seen[:6]) == sorted(seen[6:]) == list(range(6)), "every image once per epoch"
    assert any(not r["scale"] for r in two[1]), "a short batch leaves rank 1 a weight-0 sample"
    losses = [json.loads((tmp_path / n / "manifest.json").read_text())["artifacts"] for n in ("one", "two")]
    for key in ("loss_first", "loss_last"):
        assert losses[1][key] == pytest.approx(losses[0][key], rel=1e-5), "the logged loss is the global batch's"
    assert_close(tmp_path / "one" / "tiny.safetensors", tmp_path / "two" / "tiny.safetensors")
    # DDP's gradients are views into its reduction buckets, not a second copy of them (memory); control: one
    # process, no DDP, holds each gradient in its own storage
    for name, ranks in (("one", [0]), ("two", [0, 1])):
        for rank in ranks:
            records = [json.loads(line) for line in (tmp_path / f"probe-{name}" / f"grads{rank}.jsonl").read_text()
                       .splitlines()]
            assert records and all(r["grads"] >= 20 for r in records)
            if name == "one":
                assert all(r["storages"] == r["grads"] for r in records)
            else:
                assert all(r["storages"] <= 4 for r in records[2:]), records

    summed = tmp_path / "summed"
    (tmp_path / "probe-summed").mkdir()
    code, text = launch([str(BIN / "torchrun"), "--nproc-per-node=2", "--master-addr=127.0.0.1",
                         f"--master-port={free_port()}", *lora_run_args(recipe, summed, [*common, "train.batch_size=1"])],
                        tmp_path / "summed.log", LORA_RUN_PROBE=str(tmp_path / "probe-summed"),
                        LORA_RUN_PROBE_PLANT="sum-gradients")
    assert code == 0, text
    with pytest.raises(AssertionError):
        assert_close(tmp_path / "one" / "tiny.safetensors", summed / "tiny.safetensors")


# ------------------------------------------------------------------------------------- accelerate launch
@pytest.mark.slow
def test_accelerate_launch_and_two_nodes_on_one_machine_equal_one_process(flux_recipe, run_recipe, five_images,
                                                                          tmp_path):
    """With the CLIP-L text-encoder LoRA trained for the first half of the steps (it joins DDP, then stops
    getting gradients)."""
    recipe = flux_recipe(data=five_images)
    te = ["text_encoder.train=true", "text_encoder.train_fraction=0.5"]
    one = run_recipe(recipe, [*ONE, *te, "train.steps=3"], output=tmp_path / "one")
    assert any("lora_te" in k for k in lora_tensors(one.artifacts["lora_kohya"]))
    # accelerate 1.x starts several CPU processes through torchrun with --multi_gpu (its --cpu form starts
    # one process unless an mpirun hostfile is given); without CUDA they use gloo
    acc = tmp_path / "accelerate"
    code, text = launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                         "--mixed_precision=no", "--dynamo_backend=no", "--main_process_ip=127.0.0.1",
                         f"--main_process_port={free_port()}",
                         *lora_run_args(recipe, acc, [*TWO, *te, "train.steps=3"])],
                        tmp_path / "acc.log", HF_HOME=str(tmp_path / "hf"))     # no user config: only the flags
    assert code == 0, text
    assert_close(one.artifacts["lora_kohya"], acc / "tiny.safetensors")
    only_rank_0_wrote(acc, [2], 3)

    # two "nodes" (one process each) joining one rendezvous on 127.0.0.1
    nodes = tmp_path / "nodes"
    port = free_port()
    procs = [start([str(BIN / "torchrun"), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                    "--master-addr=127.0.0.1", f"--master-port={port}",
                    *lora_run_args(recipe, nodes, [*TWO, *te, "train.steps=3"])], tmp_path / f"node{rank}.log")
             for rank in (0, 1)]
    results = [finish(p, tmp_path / f"node{rank}.log") for rank, p in enumerate(procs)]
    assert [c for c, _ in results] == [0, 0], results
    assert_close(one.artifacts["lora_kohya"], nodes / "tiny.safetensors")
    only_rank_0_wrote(nodes, [2], 3)


# ------------------------------------------------------------------------------------------------- FSDP
@pytest.mark.slow
def test_fsdp_shards_the_base_and_writes_the_same_state_as_one_process(flux_recipe, run_recipe, five_images,
                                                                       tmp_path):
    from safetensors.torch import load_file

    """With TensorBoard and samples: under FSDP every rank takes part in sampling, rank 0 writes."""
    recipe = flux_recipe(data=five_images)
    samples = ["sample.every_steps=2", "sample.steps=2", "sample.width=64", "sample.height=64",
               'sample.prompts=["{trigger} photo"]']
    one = run_recipe(recipe, [*ONE, *samples, "train.steps=3"], output=tmp_path / "one")
    run = tmp_path / "fsdp"
    code, text = launch([str(BIN / "torchrun"), "--nproc-per-node=2", "--master-addr=127.0.0.1",
                         f"--master-port={free_port()}",
                         *lora_run_args(recipe, run, [*TWO, *samples, "train.steps=3", "backend.native.fsdp=true",
                                                      "backend.native.tensorboard=true"])],
                        tmp_path / "fsdp.log")
    assert code == 0, text
    assert "FSDP2" in text
    assert json.loads((run / "manifest.json").read_text())["processes"]["sharding"] == "fsdp2"
    assert_close(one.artifacts["lora_kohya"], run / "tiny.safetensors")
    assert list((run / "logs").rglob("events.out.tfevents.*")), "rank 0's TensorBoard log"
    import numpy as np
    from PIL import Image

    written = sorted(p.relative_to(run) for p in (run / "samples").rglob("*.png"))
    assert [str(p) for p in written] == ["samples/step-000002/p00-seed1-x1.png", "samples/step-000003/p00-seed1-x1.png"]
    for rel in written:
        a = np.asarray(Image.open(Path(one.run_dir.path) / rel), dtype=np.int16)
        b = np.asarray(Image.open(run / rel), dtype=np.int16)
        assert int(np.abs(a - b).max()) <= 2, rel
    # the resumable state has the one-process layout: whole tensors under the same names
    for name in ("trainable", "optimizer"):
        a = load_file(str(Path(one.run_dir.path) / "checkpoints/step-000002/resume" / f"{name}.safetensors"))
        b = load_file(str(run / "checkpoints/step-000002/resume" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and a
        for k in a:
            assert a[k].shape == b[k].shape, k
            assert float((a[k] - b[k]).abs().max()) <= REL * (float(a[k].abs().max()) or 1.0), k
    # and it resumes under FSDP on 2 processes
    code, text = launch([str(BIN / "torchrun"), "--nproc-per-node=2", "--master-addr=127.0.0.1",
                         f"--master-port={free_port()}",
                         *lora_run_args(recipe, run, [*TWO, *samples, "train.steps=4", "backend.native.fsdp=true",
                                                      "backend.native.tensorboard=true"], "--resume")],
                        tmp_path / "fsdp-resume.log")
    assert code == 0, text
    assert (run / "run.log").read_text().count("resumed from step-000002") == 1
    longer = run_recipe(recipe, [*ONE, *samples, "train.steps=4"], output=tmp_path / "one-4")
    assert_close(longer.artifacts["lora_kohya"], run / "tiny.safetensors")


def test_fsdp_refuses_what_it_cannot_shard(flux_recipe):
    from lora_run.cli import main

    recipe = flux_recipe()
    assert main(["check", str(recipe), "--set", "backend.native.fsdp=true", "--set", "model.base_precision=\"fp8\""]) == 2
    assert main(["check", str(recipe), "--set", "backend.native.fsdp=true"]) == 0


# ---------------------------------------------------------------------------------- stop and failure
def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _rank_pid(parent: int, rank: int) -> int | None:
    for pid in _children(parent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def _wait_for(predicate, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError("timed out")


def _signal_at_step_10(proc: subprocess.Popen, out: Path, log: Path, sig: int, rank: int | None = None
                       ) -> tuple[int, str]:
    """Once the run's log reports step 10 (of 400): ``sig`` to rank ``rank``'s process, or (None) to the launcher's
    whole process group, as a terminal's Ctrl-C; then the launcher's exit code and output (``finish``)."""
    try:
        _wait_for(lambda: (out / "run.log").is_file() and "step 10/400" in (out / "run.log").read_text())
        if rank is None:
            os.killpg(proc.pid, sig)
        else:
            pid = _rank_pid(proc.pid, rank)
            assert pid is not None, f"no process of rank {rank}"
            os.kill(pid, sig)
    finally:
        result = finish(proc, log)
    return result

@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_step_with_a_resumable_checkpoint(flux_recipe, five_images, tmp_path):
    recipe = flux_recipe(data=five_images)
    out = tmp_path / "stop"
    log = tmp_path / "stop.log"
    proc = start([sys.executable, *lora_run_args(recipe, out, [*TWO, "train.steps=400",
                                                                "train.save_every_steps=1000"], "--gpus", "2")], log)
    code, text = _signal_at_step_10(proc, out, log, signal.SIGINT)   # a terminal's Ctrl-C: the whole group
    assert code == 130, text
    assert "resume with" in text
    found = sorted((out / "checkpoints").glob("step-*/resume/state.json"))
    assert len(found) == 1, "rank 0 saved exactly one resumable state"
    assert 10 <= json.loads(found[0].read_text())["step"] < 400
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert not (out / "tiny.safetensors").exists()


@pytest.mark.slow
def test_a_failed_rank_ends_the_run_with_exit_1_and_its_log_tail(flux_recipe, five_images, tmp_path):
    recipe = flux_recipe(data=five_images)
    out = tmp_path / "crash"
    log = tmp_path / "crash.log"
    proc = start([sys.executable, *lora_run_args(recipe, out, [*TWO, "train.steps=400"], "--gpus", "2")], log)
    code, text = _signal_at_step_10(proc, out, log, signal.SIGKILL, rank=1)
    assert code == 1, text
    assert "rank 1 was killed by SIGKILL" in text and "last output" in text, text[-6000:]
    assert json.loads((out / "manifest.json").read_text())["status"] != "completed"


def _root_cause(text: str) -> str:
    """torchrun's failure summary from "Root Cause" on."""
    assert "Root Cause" in text, text[-6000:]
    return text[text.index("Root Cause"):]


@pytest.mark.slow
def test_a_rank_that_raises_ends_a_torchrun_run_with_its_message_as_the_root_cause(flux_recipe, five_images, tmp_path):
    """Under your own torchrun, rank 1 fails (an out-of-memory error, say) at step 3: the launcher stops rank 0 and
    exits non-zero, and its summary's Root Cause is rank 1's message, worded as rank 0's crash would be (rank 1 once
    said "unexpected RuntimeError … a bug in lora-run" and left the launcher's error file empty)."""
    recipe = flux_recipe(data=five_images)
    out = tmp_path / "raise"
    (tmp_path / "probe").mkdir()
    started = time.time()
    code, text = launch([str(BIN / "torchrun"), "--nproc-per-node=2", "--master-addr=127.0.0.1",
                         f"--master-port={free_port()}", *lora_run_args(recipe, out, [*TWO, "train.steps=40"])],
                        tmp_path / "raise.log", timeout=180, LORA_RUN_PROBE=str(tmp_path / "probe"),
                        LORA_RUN_PROBE_RAISE="1:3")
    assert code != 0 and time.time() - started < 150, text
    cause = _root_cause(text)
    assert "rank      : 1" in cause and 'backend "native" crashed on rank 1 of 2: RuntimeError: probe: out of ' \
        "memory on rank 1 in step 3" in cause, cause
    assert "a bug in lora-run" not in text
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert not (out / "tiny.safetensors").exists()


@pytest.mark.slow
def test_a_stop_agreed_after_a_slow_step_keeps_rank_0s_checkpoint(flux_recipe, five_images, tmp_path):
    """Ctrl-C reaches rank 0 alone, whose step then takes 12 s more: the ranks agree on the stop, and rank 1 waits
    for rank 0's checkpoint before it exits. It used to exit at once; torchrun then stopped rank 0 (SIGTERM), which,
    more than 10 s after its Ctrl-C, took it for a second one and aborted the save: no resumable state. Rank 1's
    message names rank 0's checkpoint (it said "a resumable state is in None")."""
    recipe = flux_recipe(data=five_images)
    out = tmp_path / "stop"
    log = tmp_path / "stop.log"
    (tmp_path / "probe").mkdir()
    proc = start([str(BIN / "torchrun"), "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                  *lora_run_args(recipe, out, [*TWO, "train.steps=400", "train.save_every_steps=1000"])], log,
                 LORA_RUN_PROBE=str(tmp_path / "probe"), LORA_RUN_PROBE_SLOW_STOP="0:12")
    code, text = _signal_at_step_10(proc, out, log, signal.SIGINT, rank=0)
    assert code != 0, text                      # torchrun's own exit code for workers that exited with 130
    found = sorted((out / "checkpoints").glob("step-*/resume/state.json"))
    assert len(found) == 1, text[-6000:]
    step = json.loads(found[0].read_text())["step"]
    assert text.count(f"a resumable state is in {out / 'checkpoints' / f'step-{step:06d}'}") == 2, text[-6000:]
    assert "resumable state is in None" not in text
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"


# ------------------------------------------------------------------------------------------------ units
def test_more_gpus_than_cuda_devices_is_refused_with_the_key_named():
    from lora_run_native.distributed import validate_gpus

    with pytest.raises(RecipeError) as err:
        validate_gpus(4, cuda_available=True, device_count=2, shown="r.toml")
    assert err.value.exit_code == 2
    assert "[train.gpus]" in str(err.value) and "2 CUDA device" in str(err.value)
    assert "several machines: see `lora-run docs multi-gpu`" in str(err.value)   # a page every install has
    validate_gpus(2, cuda_available=True, device_count=2)
    validate_gpus(4, cuda_available=False, device_count=0)        # no CUDA: N gloo CPU processes


def test_shards_are_disjoint_and_cover_the_global_batch():
    from lora_run_native.distributed import shard

    for size in range(0, 9):
        for per in (1, 2, 3):
            for world in (1, 2, 4):
                if size > per * world:
                    continue
                covered = []
                for rank in range(world):
                    lo, hi = shard(size, per, rank)
                    covered.extend(range(lo, hi))
                assert covered == list(range(size))


def test_processes_come_from_the_launchers_environment():
    from lora_run.run import Processes

    assert Processes.from_env({}) == Processes(0, 1, False)
    assert Processes.from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Processes(1, 2, True)
    assert not Processes.from_env({"RANK": "1", "WORLD_SIZE": "2"}).main
    for bad in ({"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}):
        with pytest.raises(RecipeError):
            Processes.from_env(bad)


def test_resume_may_change_the_process_count_but_not_the_global_batch():
    from lora_run_rundir.resume import resume_differences as _resume_differences

    saved = {"train": {"batch_size": 1, "gpus": 2, "steps": 4}}
    assert _resume_differences(saved, {"train": {"batch_size": 2, "gpus": 1, "steps": 8}}) == []
    assert _resume_differences(saved, {"train": {"batch_size": 1, "gpus": 4, "steps": 4}}) == [
        "train.batch_size × train.gpus (the global batch: 1 × 2 before, 1 × 4 now; keep it: --gpus 2 with "
        "train.batch_size = 1)"]
    # the way on is named: a 2-process run pasted without its launcher (one process) takes batch 2 on 1 process
    assert _resume_differences(saved, {"train": {"batch_size": 1, "gpus": 1, "steps": 4}}) == [
        "train.batch_size × train.gpus (the global batch: 1 × 2 before, 1 × 1 now; keep it: --gpus 2 with "
        "train.batch_size = 1 or train.batch_size = 2 on 1 process(es))"]


@pytest.mark.parametrize("recipe_gpus, world", [(1, 2), (4, 2), (2, 1)])
def test_under_a_launcher_the_printed_resume_line_resumes_with_its_process_count(flux_recipe, monkeypatch, recipe_gpus,
                                                                                 world):
    """Under torchrun the launcher's process count becomes `[train] gpus` of the run (its recipe.toml); the
    `--resume` line the run prints (Ctrl-C, a crash, a NaN) must say it: pasted as printed, it used to ask for the
    recipe's count and was refused ("the global batch: 1 × 2 before, 1 × 1 now")."""
    import shlex

    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe, resume_command, to_dict
    from lora_run.run import RunContext, validate
    from lora_run_native.processes import take_part
    from lora_run_rundir.resume import resume_differences

    plugins = load_plugins()
    loaded = load_recipe(flux_recipe(), [f"train.gpus={recipe_gpus}"], plugins=plugins)
    prepared = validate(loaded, plugins)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    ctx = RunContext(prepared.recipe, plugins, prepared.backend, prepared.options, loaded, echo=lambda *_: None)
    assert take_part(ctx, None, False) is None            # rank 0 goes on in core's run
    assert ctx.recipe.train.gpus == world                 # what the run folder records
    line = shlex.split(resume_command(ctx.loaded, "runs/x"))
    again = load_recipe(line[1], [line[i + 1] for i, a in enumerate(line) if a == "--set"], plugins=plugins)
    assert again.recipe.train.gpus == world
    assert resume_differences(to_dict(ctx.recipe), to_dict(validate(again, plugins).recipe)) == []


def test_gpus_key_and_flag(flux_recipe, tmp_path):
    from lora_run.cli import main
    from lora_run.recipe import load_recipe

    recipe = flux_recipe()
    assert load_recipe(recipe).recipe.train.gpus == 1
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, ["train.gpus=0"])
    assert "[train.gpus]" in str(err.value)
    # `--gpus` overrides the key; a bad value is refused before anything is written
    out = tmp_path / "never"
    assert main(["run", str(recipe), "--gpus", "0", "--output-dir", str(out)]) == 2
    assert not out.exists()


def test_gpus_into_a_used_folder_is_refused_before_any_process_starts(flux_recipe, tmp_path, capsys):
    from lora_run.cli import main

    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["run", str(flux_recipe()), "--gpus", "2", "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_plan_shows_the_global_batch(flux_recipe, capsys):
    from lora_run.cli import main

    assert main(["plan", str(flux_recipe()), "--set", "train.gpus=2", "--set", "train.batch_size=3"]) == 0
    assert "data-parallel on 2 processes" in capsys.readouterr().out


def test_python_dash_m_lora_run_is_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lora_run", "--version"], env=env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("lora-run ")


def test_launchers_are_installed():
    for name in ("torchrun", "accelerate"):
        assert shutil.which(name, path=str(BIN)), name


def test_a_backend_with_its_own_launcher_refuses_to_run_under_torchrun(tmp_path, monkeypatch, capsys):
    """kohya / diffusion-pipe start accelerate / deepspeed themselves: N copies of them would each start one."""
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute

    class OwnLauncher:
        def __init__(self, ctx):
            self.ctx = ctx

        def plan(self):
            raise AssertionError("never reached")

        def run(self):
            raise AssertionError("never reached")

    from lora_run.hookspecs import hookimpl

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            from lora_run_native.adapters import adapter_class

            register("own", OwnLauncher, capabilities={"flux.1-dev": adapter_class("flux.1-dev").features})

    from lora_run_devtools.testing import make_images

    make_images(tmp_path / "data", count=2, size=(64, 64))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nfamily = "flux.1-dev"\nsource = "x/y"\n[dataset]\npath = "{tmp_path / "data"}"\n'
                      'trigger = "ohwx"\nmin_images = 1\nresolution = 64\nbucket_min = 64\nbucket_max = 96\n'
                      'bucket_step = 16\n[train]\nsteps = 1\n[eval]\nenabled = false\n'
                      '[backend]\nname = "own"\n', encoding="utf-8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    with pytest.raises(RecipeError) as err:
        execute(load_recipe(recipe), load_plugins(extra=[Plugin()]), output_dir=str(out), echo=lambda *_: None)
    assert "starts its own processes" in str(err.value) and "--gpus 2" in str(err.value)
    assert not out.exists()


def test_a_failing_process_leaves_its_message_for_the_launcher(tmp_path):
    """torchrun names an error file per process; lora-run writes its message there (the launcher's summary)."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 3.5\n", encoding="utf-8")
    report = tmp_path / "error.json"
    done = subprocess.run([sys.executable, "-m", "lora_run", str(bad)], capture_output=True, text=True, timeout=60,
                          env={**env(), "TORCHELASTIC_ERROR_FILE": str(report)})
    assert done.returncode == 2
    data = json.loads(report.read_text())
    assert "RecipeError (exit 2)" in data["message"] and "[train.steps]" in data["message"]
    assert isinstance(data["timestamp"], int)


def test_the_rank_killed_by_a_signal_is_named_as_the_cause_whatever_the_timestamps(tmp_path):
    """torchrun lists every failed rank. A rank killed by SIGKILL writes no error file, so its timestamp is the second
    torchrun noticed it; its peer, whose collective broke, exits with an error and the second it wrote its error file,
    which can be earlier. The killed rank is the cause (this test failed one run in a few when the earliest won), and a
    rank torchrun stopped (SIGTERM, or 130 from the stop it asked for) is named only when nothing else failed."""
    from types import SimpleNamespace

    from lora_run_native.distributed import _failure

    def failed(code, when, rank):
        return SimpleNamespace(exitcode=code, timestamp=when, local_rank=rank, message="", error_file_data={})

    cases = [({0: failed(1, 100, 0), 1: failed(-9, 101, 1)}, "rank 1 was killed by SIGKILL"),
             ({0: failed(130, 99, 0), 1: failed(1, 101, 1)}, "rank 1 failed with exit code 1"),
             ({0: failed(-15, 99, 0), 1: failed(-11, 102, 1)}, "rank 1 was killed by SIGSEGV"),
             ({0: failed(1, 100, 0), 1: failed(1, 101, 1)}, "rank 0 failed with exit code 1"),   # the earliest
             ({0: failed(-15, 99, 0), 1: failed(-15, 98, 1)}, "rank 1 was killed by SIGTERM")]
    for failures, says in cases:
        message = str(_failure(SimpleNamespace(failures=failures), str(tmp_path), "recipe.toml"))
        assert says in message, (failures, message)
