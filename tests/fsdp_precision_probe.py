"""Under FSDP with bf16 mixed precision: the dtype each parameter has while its module computes (one process).

Prints "PROBE {json}" with the compute dtypes of a decoder Linear's weight and of every DyISRU's log_kappa and weight,
seen by forward pre-hooks during a forward of a tiny converted Llama prepared as hf_dynorm.distill prepares it.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import hf_dynorm  # noqa: E402
from hf_dynorm.config import DistillConfig  # noqa: E402
from hf_dynorm.distill import apply_schedule, wrap_sites  # noqa: E402
from hf_dynorm.modeling_dynorm import DyISRU  # noqa: E402
from hf_dynorm.parallel import is_fsdp, make_accelerator, shard_norms_in_fp32  # noqa: E402
from tiny import tiny_inputs, tiny_model  # noqa: E402

config = DistillConfig(mixed_precision="bf16", report_to="none", ramp_steps=1)
accelerator = make_accelerator(config, sys.argv[1])
model = tiny_model("llama")
originals = {site.name: model.get_submodule(site.name) for site in hf_dynorm.find_norm_sites(model)}
hf_dynorm.convert(model, "dyisru", anchors=[1, 2])
sites = wrap_sites(model, originals)
apply_schedule(sites, {name: 0 for name in sites}, 5, config)
shard_norms_in_fp32(list(sites.values()), accelerator)
model = accelerator.prepare(model)
seen = {}


def record(label, tensor):
    seen.setdefault(label, set()).add(str(tensor.dtype).removeprefix("torch."))


def norm_hook(module, _):
    record("log_kappa", module.log_kappa)
    record("norm weight", module.weight)


for module in model.modules():
    if isinstance(module, DyISRU):
        module.register_forward_pre_hook(norm_hook)
model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, _: record("q_proj weight", m.weight))
with torch.no_grad():
    logits = model(input_ids=tiny_inputs()).logits
print("PROBE " + json.dumps({"fsdp": is_fsdp(accelerator), "finite": bool(torch.isfinite(logits).all()),
                             **{k: sorted(v) for k, v in seen.items()}}))
