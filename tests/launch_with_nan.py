"""`python -m hf_dynorm.distill` with the loss of one process made NaN at chosen steps: a fault on one rank only.

    accelerate launch --config_file CONFIG tests/launch_with_nan.py --config RECIPE ... (NAN_RANK=1 NAN_STEPS=2,3)
"""

import os
import sys

import hf_dynorm.distill as distill

RANK = int(os.environ.get("RANK", "0"))
NAN_RANK = int(os.environ["NAN_RANK"])
NAN_STEPS = {int(step) for step in os.environ["NAN_STEPS"].split(",")}
_original_losses = distill.losses
_calls = 0


def losses(*args):
    """The recipe's losses; on NAN_RANK at the NAN_STEPS-th calls (one call per step), every term times NaN."""
    global _calls
    terms = _original_losses(*args)
    if RANK == NAN_RANK and _calls in NAN_STEPS:
        terms = {name: term * float("nan") for name, term in terms.items()}
    _calls += 1
    return terms


distill.losses = losses
sys.exit(distill.main())
