"""diffusion-pipe's own start-up on CPU, as far as it goes without CUDA: train.py's module (its argument
parser, imports, patches), set_config_defaults on lora-run's generated config, the model class built from it,
the dataset config parsed by utils.dataset and (with --cache) its latent/text-embedding caching.
train.py itself stops at torch.cuda.set_device; this runs the same functions in the same order, with
ComfyUI's model management told to use the CPU and a one-process gloo group instead of NCCL.
usage (with diffusion-pipe's packages on PYTHONPATH; CONFIG is a lora-run run folder's diffusion-pipe/config.toml):
    python bench/engine_dpipe_cpu.py DIFFUSION_PIPE CONFIG [--cache]
HARNESS_MODULES=<dir> lists the top-level packages it imported from <dir> (how the GPU wheel list was found).
It stops with diffusion-pipe's own error where the engine needs CUDA (the recorded fixtures in
tests/diffusion_pipe/fixtures/diffusion-pipe-8f83dbf/ came from it)."""
import json, os, sys, time
dpipe, config_path = sys.argv[1], sys.argv[2]
cache = "--cache" in sys.argv
os.chdir(dpipe)
sys.path.insert(0, dpipe)
sys.argv = ["train.py", "--deepspeed", "--config", config_path]
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29517")
os.environ.setdefault("RANK", "0"); os.environ.setdefault("WORLD_SIZE", "1"); os.environ.setdefault("LOCAL_RANK", "0")
from utils import common  # noqa: E402  (diffusion-pipe's utils before ComfyUI's)
sys.path.insert(0, os.path.join(dpipe, "submodules", "ComfyUI"))
if sys.version_info < (3, 12):  # diffusion-pipe's utils/cache.py passes autocommit= (Python 3.12+); this CPU
    import sqlite3               # venv is 3.11: emulate it with an explicit-transaction connection
    _connect = sqlite3.connect
    def _connect_312(*a, autocommit=None, **kw):
        con = _connect(*a, **kw)
        if autocommit is False:
            con.isolation_level = "DEFERRED"
        return con
    sqlite3.connect = _connect_312
import comfy.cli_args  # noqa: E402
comfy.cli_args.args.cpu = True
t0 = time.time()
import toml  # noqa: E402
import train  # noqa: E402
print(f"[harness] train.py imported ({time.time() - t0:.1f} s)", flush=True)
train.apply_patches()
with open(config_path) as f:
    config = json.loads(json.dumps(toml.load(f)))
train.set_config_defaults(config)
common.AUTOCAST_DTYPE = config["model"]["dtype"]
print(f"[harness] set_config_defaults accepted {config_path}: model.type={config['model']['type']}", flush=True)
import deepspeed  # noqa: E402
deepspeed.init_distributed(dist_backend="gloo")
model_type = config["model"]["type"]
if model_type == "flux":
    from models import flux
    model = flux.FluxPipeline(config)
elif model_type == "hunyuan_image":
    from models import hunyuan_image
    model = hunyuan_image.HunyuanImagePipeline(config)
print(f"[harness] {type(model).__name__} built", flush=True)
with open(config["dataset"]) as f:
    dataset_config = toml.load(f)
from utils import dataset as dataset_util  # noqa: E402
manager = dataset_util.DatasetManager(model, regenerate_cache=False, trust_cache=False,
                                      caching_batch_size=config.get("caching_batch_size", 1))
data = dataset_util.Dataset(dataset_config, model)
manager.register(data)
print("[harness] dataset config accepted", flush=True)
if cache:
    manager.cache()
    print("[harness] caching finished", flush=True)
if os.environ.get("HARNESS_MODULES"):   # which carried packages diffusion-pipe imported (for the GPU carry list)
    site = os.environ["HARNESS_MODULES"]
    tops = sorted({m.split(".")[0] for m, mod in list(sys.modules.items())
                   if getattr(mod, "__file__", None) and str(mod.__file__).startswith(site)})
    print("[harness] imported from", site, ":", " ".join(tops), flush=True)
