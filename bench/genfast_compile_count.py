"""CPU, on the branch `wip/compiled-generation` (genfast.py): how many compilations the evaluation's compiled
blocks make as the batch size changes between calls (the tiny FLUX.1 transformer, 2 double and 4 single blocks, a
counting backend). Run with that branch's core/ and plugins/ on PYTHONPATH; docs/performance.md has the result."""
import torch
from diffusers import FluxTransformer2DModel
from lora_run_native import genfast
torch.manual_seed(0)
model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=4, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                               axes_dims_rope=(2, 2, 4)).eval()
def inputs(b, t=0.5):
    ids = torch.zeros(16, 3); ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=torch.randn(b, 16, 8), encoder_hidden_states=torch.randn(b, 4, 16),
                pooled_projections=torch.randn(b, 8), timestep=torch.full((b,), t), img_ids=ids,
                txt_ids=torch.zeros(4, 3), guidance=None, return_dict=False)
graphs = []
def backend(gm, ex):
    graphs.append(tuple(tuple(e.shape) if hasattr(e, "shape") else e for e in ex[:1]))
    return gm.forward
with torch.no_grad(), genfast.compiled_blocks(model, enabled=True, backend=backend) as st:
    for b, t in [(8, .9), (8, .5), (7, .9), (7, .3), (8, .2), (3, .5)]:
        n = len(graphs)
        model(**inputs(b, t))
        print("batch", b, "t", t, "new compilations", len(graphs) - n)
print("total", len(graphs))
