"""Only for reduced random-weight model files (bench/engine_models.py). On PYTHONPATH, with one of these
variables set, the engine's fixed model configs get fewer blocks; without them this file does nothing.
Nothing else of the engine is changed.

- ``LORA_RUN_T5_LAYERS=N``: every T5Config built in the process gets N encoder blocks. sd-scripts builds its
  T5-XXL from a fixed 24-block config and loads the file with strict=False, so a checkpoint with fewer blocks
  would leave the others on the meta device.
- ``LORA_RUN_HY_BLOCKS=D,S``: sd-scripts' HunyuanImage-2.1 DiT (``library.hunyuan_image_models.
  HYImageDiffusionTransformer``, 20 double + 40 single blocks fixed in its ``__init__``) keeps its first D
  double and S single blocks (it loads its file with strict=True, so the file must have exactly those).
- ``LORA_RUN_QWEN_LAYERS=T,V``: every Qwen2.5-VL config (sd-scripts builds Qwen2.5-VL-7B from a fixed JSON in
  ``library/hunyuan_image_text_encoder.py``) gets T language layers and V vision blocks, full width.
"""
import os
import sys


def _pair(name):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    a, b = (int(x) for x in raw.split(","))
    return a, b


_t5 = os.environ.get("LORA_RUN_T5_LAYERS", "").strip()
if _t5:
    try:
        from transformers.models.t5 import configuration_t5 as _c

        _init = _c.T5Config.__init__

        def _patched(self, *args, **kwargs):
            kwargs["num_layers"] = int(_t5)
            kwargs["num_decoder_layers"] = int(_t5)
            _init(self, *args, **kwargs)

        _c.T5Config.__init__ = _patched
    except Exception:  # noqa: BLE001 - never break an interpreter start
        pass

try:
    _qwen = _pair("LORA_RUN_QWEN_LAYERS")
except ValueError:
    _qwen = None
if _qwen:
    try:
        from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as _q

        _qinit = _q.Qwen2_5_VLConfig.__init__

        def _qpatched(self, *args, text_config=None, vision_config=None, **kwargs):
            text, vision = _qwen
            if isinstance(text_config, dict):
                text_config = dict(text_config, num_hidden_layers=text, max_window_layers=text)
                if isinstance(text_config.get("layer_types"), list):
                    text_config["layer_types"] = text_config["layer_types"][:text]
            if "num_hidden_layers" in kwargs:
                kwargs["num_hidden_layers"] = text
            if "max_window_layers" in kwargs:
                kwargs["max_window_layers"] = text
            if isinstance(vision_config, dict):
                vision_config = dict(vision_config, depth=vision,
                                     fullatt_block_indexes=[i for i in vision_config.get("fullatt_block_indexes", [])
                                                            if i < vision] or [vision - 1])
            _qinit(self, *args, text_config=text_config, vision_config=vision_config, **kwargs)

        _q.Qwen2_5_VLConfig.__init__ = _qpatched
    except Exception:  # noqa: BLE001
        pass

try:
    _hy = _pair("LORA_RUN_HY_BLOCKS")
except ValueError:
    _hy = None
if _hy:
    import importlib.abc
    import importlib.util

    def _shrink(module):
        cls = module.HYImageDiffusionTransformer
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            import torch.nn as nn

            init(self, *args, **kwargs)
            self.double_blocks = nn.ModuleList(list(self.double_blocks)[:_hy[0]])
            self.single_blocks = nn.ModuleList(list(self.single_blocks)[:_hy[1]])
            self.num_double_blocks = len(self.double_blocks)
            self.num_single_blocks = len(self.single_blocks)

        cls.__init__ = __init__

    class _Finder(importlib.abc.MetaPathFinder):
        """Patches ``library.hunyuan_image_models`` right after sd-scripts imports it."""

        def find_spec(self, name, path=None, target=None):
            if name != "library.hunyuan_image_models":
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _shrink(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
