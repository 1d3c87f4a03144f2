"""Homogenise: teach a model, its norms still in place, to give every ordinary token about the same rms at every norm.

An element-wise function has one response per channel, where RMSNorm divides each token by its own rms: the wider
the spread of token rms at a site, the further a pure DyT/DyISRU is from the norm on the tokens at either end of it.
On SmolLM2 the first layers' small per-site errors made the massive-activation generator of layers ~2-4 fire on
ordinary tokens and a pure swap ran away (README, "Pure element-wise models"). This stage fine-tunes LoRA adapters
against the model itself (KL to its own adapter-free outputs) plus `weight` x the spread of log token-rms over
positions >= 1 (the first position is the attention sink's), averaged over the norm sites, then merges them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .architectures import find_norm_sites, observing_norm_inputs
from .losses import SoftenedKL


def log_rms_spread(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The mean over sites of the variance of log token-rms over positions >= 1, from each site's input
    (batch, sequence, channels)."""
    spreads = [0.5 * x[:, 1:].float().square().mean(-1).clamp_min(1e-12).log() for x in inputs]
    return torch.stack([s.var() for s in spreads]).mean()


def cosine_with_warmup(warmup: int, total: int):
    """The learning-rate multiplier of step: linear warmup, then cosine to 0 at `total`."""
    return lambda step: min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(step, total) /
                                                                                        total))


def homogenise(model: nn.Module, windows: torch.Tensor, *, steps: int, weight: float, learning_rate: float,
               lora_r: int = 16, lora_alpha: int = 32, batch_size: int = 2, warmup_steps: int = 10,
               max_grad_norm: float = 1.0, seed: int = 0, log=print) -> tuple[nn.Module, list[dict]]:
    """Train LoRA adapters on `windows` (n, length) for `steps` steps of `batch_size` windows, then merge them.
    Returns the homogenised model (its norms untouched) and the per-step losses."""
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    sites = [site.name for site in find_norm_sites(model)]
    student = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear",
                                               lora_dropout=0.0))
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup_steps, steps))
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(windows), generator=generator)
                       for _ in range(math.ceil(steps * batch_size / len(windows)) + 1)])
    history, captured = [], []
    student.train()
    with observing_norm_inputs(model, {name: captured.append for name in sites}):  # (PEFT wraps model in place)
        for step in range(steps):
            batch = windows[order[step * batch_size:(step + 1) * batch_size]].to(device)
            with torch.no_grad(), student.disable_adapter():
                teacher = student(input_ids=batch).logits
            captured.clear()
            logits = student(input_ids=batch).logits
            kl, spread = SoftenedKL.apply(logits, teacher, 1.0), log_rms_spread(captured)
            loss = kl + weight * spread
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"homogenisation step {step}: non-finite loss; lower its learning rate" if step else
                    "homogenisation: the model's own loss is non-finite before any update (KL "
                    f"{kl.item():.4g}, log-rms spread {spread.item():.4g}): check that it runs in fp32 on this data")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            history.append({"step": step + 1, "kl": kl.item(), "spread": spread.item()})
            if (step + 1) % max(1, steps // 5) == 0:
                log(f"homogenise step {step + 1}/{steps}: KL {kl.item():.4f}, log-rms spread {spread.item():.4f}")
    captured.clear()
    return student.merge_and_unload().eval(), history
