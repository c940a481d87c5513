"""A stand-in for DeepSpeed's `deepspeed` launcher (tests only; copied into a temp bin folder with a shebang).

Parses the launcher options lora-run passes (`--num_gpus=N`, `--master_port=P`), starts `python -u SCRIPT
--local_rank=R ARGS...` once per GPU with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_PORT set, forwards SIGINT and
SIGTERM to them and exits with the first non-zero exit code, like deepspeed.launcher.launch. With
FAKE_DP_RECORD set, appends {argv, cwd, env} as a JSON line to that file.
"""
import json
import os
import signal
import subprocess
import sys
import time


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
    # the lines the real launcher (DeepSpeed 0.18.4) prints, as recorded in
    # fixtures/diffusion-pipe-8f83dbf/launch_no_gpu.log (the accelerator line is the GPU variant, not yet recorded)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    script, rest = args[0], args[1:]
    say = lambda level, where, text: print(f"[{stamp},001] [{level}] [{where}] {text}", flush=True)  # noqa: E731
    say("INFO", "real_accelerator.py:260:get_accelerator", "Setting ds_accelerator to cuda (auto detect)")
    say("WARNING", "runner.py:232:fetch_hostfile", "Unable to find hostfile, will proceed with training with local "
        "resources only.")
    say("INFO", "runner.py:630:main", f"cmd = {sys.executable} -u -m deepspeed.launcher.launch --world_info=e30= "
        f"--master_addr=127.0.0.1 --master_port={master_port} --enable_each_rank_log=None --log_level=info "
        f"{' '.join(args)}")
    say("INFO", "launch.py:162:main", f"WORLD INFO DICT: {{'localhost': {list(range(num_gpus))}}}")
    say("INFO", "launch.py:168:main", f"nnodes=1, num_local_procs={num_gpus}, node_rank=0")
    say("INFO", "launch.py:180:main", f"dist_world_size={num_gpus}")
    say("INFO", "launch.py:184:main", f"Setting CUDA_VISIBLE_DEVICES={','.join(map(str, range(num_gpus)))}")
    children = []
    for rank in range(num_gpus):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_gpus),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        command = [sys.executable, "-u", script, f"--local_rank={rank}", *rest]
        children.append(subprocess.Popen(command, env=env))
        say("INFO", "launch.py:272:main", f"process {children[-1].pid} spawned with command: {command}")

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

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
                print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')},500] [INFO] [launch.py:335:sigkill_handler] Killing "
                      f"subprocess {child.pid}", flush=True)
                for other in children:
                    other.terminate()
                print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')},501] [ERROR] [launch.py:341:sigkill_handler] "
                      f"{child.args} exits with return code = {rc}", flush=True)
        time.sleep(0.02)
    return code


if __name__ == "__main__":
    sys.exit(main())
