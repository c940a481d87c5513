"""A stand-in for DeepSpeed's `deepspeed` launcher (tests only; copied into a temp bin folder with a shebang).

Parses the launcher options lora-run passes (`--num_gpus=N`, `--master_port=P`), starts `python -u SCRIPT
--local_rank=R ARGS...` once per GPU with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_PORT set, forwards SIGINT and
SIGTERM to them and exits with the first non-zero exit code, like deepspeed.launcher.launch. With
FAKE_DP_RECORD set, appends {argv, cwd, env} as a JSON line to that file.

Its lines are the real launcher's (DeepSpeed 0.18.4 on one H200, 2026-12-02), read from the recordings in
fixtures/diffusion-pipe-8f83dbf/gpu-h200-20261202/ with this launch's numbers put in: `runner.py` and
`launch.py` start-up lines, `sigkill_handler`'s lines when a rank fails, and its SIGINT line.
"""
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    RECORDED_DIR  # noqa: B018 - set in the line the fake_launcher fixture puts above this file
except NameError:
    RECORDED_DIR = str(Path(__file__).resolve().parent / "fixtures" / "diffusion-pipe-8f83dbf" / "gpu-h200-20261202")


def recorded_lines():
    """The launcher's lines of the recordings, by `file.py:line` (the first of each; all of launch.py:155)."""
    found = {}
    for name in ("flux_fp8_train_nan.log", "hunyuan_image_flash_attn_train.log"):
        for line in (Path(RECORDED_DIR) / name).read_text("utf-8").splitlines():
            match = re.match(r"\[[^\]]+\] \[\w+\] \[((?:runner|launch)\.py:\d+):", line)
            if match:
                found.setdefault(match[1], []).append(line)
    return found


RECORDED = recorded_lines()


def say(where, *subs, index=0):
    """Print the recorded line of `where` (`launch.py:184`) with a fresh time stamp and the (pattern, text) subs."""
    line = RECORDED[where][index]
    line = re.sub(r"^\[[^\]]+\]", time.strftime("[%Y-%m-%d %H:%M:%S,000]"), line)
    for pattern, text in subs:
        line = re.sub(pattern, lambda _m: text, line)
    print(line, flush=True)


def main():
    args = sys.argv[1:]
    num_gpus, master_port = 1, 29500
    while args and args[0].startswith("--"):
        option = args.pop(0)
        if option.startswith("--num_gpus="):
            num_gpus = int(option.split("=", 1)[1])
        elif option.startswith("--master_port="):
            master_port = int(option.split("=", 1)[1])
        else:
            print(f"deepspeed: error: unrecognized launcher argument {option}", flush=True)
            return 2
    if not args:
        print("deepspeed: error: the following arguments are required: user_script", flush=True)
        return 2
    record = os.environ.get("FAKE_DP_RECORD")
    if record:
        keep = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "PYTORCH_", "PYTHONUNBUFFERED"))}
        with open(record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": keep}) + "\n")
    script, rest = args[0], args[1:]
    ranks = list(range(num_gpus))
    world = base64.urlsafe_b64encode(json.dumps({"localhost": ranks}).encode()).decode()
    say("runner.py:232")
    say("runner.py:630", (r"cmd = .*", f"cmd = {sys.executable} -u -m deepspeed.launcher.launch --world_info={world} "
                                       f"--master_addr=127.0.0.1 --master_port={master_port} --enable_each_rank_log=None "
                                       f"--log_level=info {' '.join(args)}"))
    for n in range(len(RECORDED["launch.py:155"])):
        say("launch.py:155", index=n)
    say("launch.py:162", (r"\[0\]", str(ranks)))
    say("launch.py:168", (r"num_local_procs=1", f"num_local_procs={num_gpus}"))
    say("launch.py:179", (r"\[0\]", str(ranks)))
    say("launch.py:180", (r"dist_world_size=1", f"dist_world_size={num_gpus}"))
    say("launch.py:184", (r"CUDA_VISIBLE_DEVICES=.*", "CUDA_VISIBLE_DEVICES=" + ",".join(map(str, ranks))))
    children = []
    for rank in range(num_gpus):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_gpus),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        command = [sys.executable, "-u", script, f"--local_rank={rank}", *rest]
        children.append(subprocess.Popen(command, env=env))
        say("launch.py:272", (r"process \d+ spawned with command: .*", f"process {children[-1].pid} spawned with "
                                                                        f"command: {command}"))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                if signum == signal.SIGINT:
                    say("launch.py:335", (r"Killing subprocess \d+", f"Killing subprocess {child.pid}"))
                child.send_signal(signum)
        if signum == signal.SIGINT:
            say("launch.py:344")

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = 0
    while children:
        for child in list(children):
            rc = child.poll()
            if rc is None:
                continue
            children.remove(child)
            if rc != 0 and code == 0:
                code = rc if rc > 0 else 1
                say("launch.py:335", (r"Killing subprocess \d+", f"Killing subprocess {child.pid}"))
                for other in children:
                    other.terminate()
                say("launch.py:341", (r"sigkill_handler\] .* exits with return code = .*",
                                      f"sigkill_handler] {child.args} exits with return code = {rc}"))
        time.sleep(0.02)
    return code


if __name__ == "__main__":
    sys.exit(main())
