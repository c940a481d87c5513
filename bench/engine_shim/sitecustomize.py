"""Only for reduced random-weight model files (bench/engine_models.py): on PYTHONPATH with
LORA_RUN_T5_LAYERS=N set, every T5Config built in the process gets N encoder blocks. sd-scripts builds its
T5-XXL from a fixed 24-block config and loads the file with strict=False, so a checkpoint with fewer blocks
would leave the others on the meta device. Nothing else of the engine is changed; without the variable this
file does nothing."""
import os

_layers = os.environ.get("LORA_RUN_T5_LAYERS", "").strip()
if _layers:
    try:
        from transformers.models.t5 import configuration_t5 as _c

        _init = _c.T5Config.__init__

        def _patched(self, *args, **kwargs):
            kwargs["num_layers"] = int(_layers)
            kwargs["num_decoder_layers"] = int(_layers)
            _init(self, *args, **kwargs)

        _c.T5Config.__init__ = _patched
    except Exception:  # noqa: BLE001 - never break an interpreter start
        pass
