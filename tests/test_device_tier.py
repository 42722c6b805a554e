"""Device tier: device and dtype mistakes that only a GPU would show, caught on a CPU.

Every method runs whole iterations (every optimizer group, the EMA update, the optimizer steps, a
checkpoint save and a resume) through the real training loop and policy at SD1.5 and SDXL
architecture size, and at SANA 1.6B, SD3.5 Medium and FLUX.1-dev size, on the ``meta`` device: tensors with shapes and dtypes but no memory or
values, and an error on any meta/CPU mix ("Tensor on device cpu is not on the expected device
meta"), as a GPU run errors on a CUDA/CPU mix. Checkpoints go through DCP's planning with a
storage that records devices instead of writing bytes (``tests/meta_storage.py``). The ``meta``
kernels' shape rules are memoised as in the planner (``components.planning.meta_cache``): a
call with any tensor off ``meta`` is never answered from the cache, so a device mix still
reaches the kernel and raises. Generation (forward only) runs on fake ``cuda`` tensors
(``FakeTensorMode``), whose backward needs a GPU.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

from components import checkpoint
from components.architectures import scheduler_config, unet_config
from components.diffusion import NoiseSchedule
from components.generation import generate_latents
from components.methods import Batch, Teacher, get_method, method_names
from components.planning.meta_cache import MetaCache
from components.policy import PolicyConfig, TrainingPolicy
from components.teacher import TextConditioning, UNetDenoiser
from components.training import LoopConfig, train
from tests.meta_storage import MetaStore

ARCHS = ("sd15", "sdxl")
# Published defaults, except the phases are split so that two iterations reach every group, and
# InstaFlow's LPIPS (ImageNet weights, not here) is off.
OVERRIDES = {"instaflow": {"reflow_fraction": 0.5, "lpips_fraction": 0.0},
             "meng": {"stage1_fraction": 0.5}}


@functools.cache
def _unet(arch: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config(arch))


def _teacher(arch: str, device: str = "meta") -> Teacher:
    sched = scheduler_config(arch)
    unet = copy.deepcopy(_unet(arch)) if device == "meta" else _fake_unet(arch)
    schedule = NoiseSchedule.from_scheduler(DDIMScheduler(**sched))
    return Teacher(UNetDenoiser(unet, schedule, sched.get("prediction_type", "epsilon")))


def _fake_unet(arch: str) -> UNet2DConditionModel:
    with torch.device("cuda"):
        return UNet2DConditionModel(**unet_config(arch))


def _cond(arch: str, batch: int, device: str) -> TextConditioning:
    cfg = unet_config(arch)
    text = torch.zeros(batch, 77, cfg["cross_attention_dim"], device=device)
    if arch != "sdxl":
        return TextConditioning(text)
    return TextConditioning(text, torch.zeros(batch, 1280, device=device),
                            torch.zeros(batch, 6, device=device))


class _MetaBatches:
    """Batches of meta tensors at the architecture's latent size (pairs included)."""

    def __init__(self, arch: str):
        self.arch, self.side = arch, unet_config(arch)["sample_size"]

    def __call__(self, batch_size: int, gen: torch.Generator, step: int = 0) -> Batch:
        shape = (batch_size, 4, self.side, self.side)
        return Batch(_cond(self.arch, batch_size, "meta"), _cond(self.arch, batch_size, "meta"),
                     torch.zeros(shape, device="meta"), gen, step,
                     torch.zeros(shape, device="meta"))


def _build(name: str, arch: str):
    cfg_cls, factory = get_method(name)
    return factory(cfg_cls(**OVERRIDES.get(name, {})), _teacher(arch), 2)


def _on_meta(module: torch.nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()]
            if t.device.type != "meta"]


def test_the_memoised_meta_kernels_refuse_a_device_mix_as_the_kernels_do():
    """After the same shapes were answered from the cache, mixed calls still reach the kernels:
    each raises (or not: ``meta`` checks devices in some kernels only) exactly as without it."""
    a, b = torch.zeros(3, 4, device="meta"), torch.zeros(3, 4, device="meta")
    mixed = {"add": lambda: a + torch.zeros(3, 4), "mm": lambda: a @ torch.zeros(4, 3),
             "add_": lambda: a.add_(torch.zeros(3, 4))}

    def outcomes() -> dict[str, str]:
        out = {}
        for key, call in mixed.items():
            try:
                call()
                out[key] = "ran"
            except RuntimeError as err:
                out[key] = str(err)
        return out

    plain = outcomes()
    assert "not on the expected device meta" in plain["add"]
    with MetaCache() as cache:
        for _ in range(2):
            assert (a @ b.T).shape == (3, 3) and (a + b).device.type == "meta"
            a.add_(b)
        assert cache.hits >= 3  # the second round came from the cache
        assert outcomes() == plain


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_checkpoints_and_resumes_on_meta(name, arch, precision, tmp_path,
                                                             monkeypatch):
    _train_and_resume(lambda: _build(name, arch), _MetaBatches(arch), precision, tmp_path,
                      monkeypatch)


# Flow-transformer teachers at their released size, built from their configs as the planner
# builds them (components.planning.teachers), with batches of their own conditioning: SANA's
# 300 Gemma tokens and mask, FLUX's packed latents and guidance input. bf16 with activation
# checkpointing, as such a teacher trains. FLUX.1-dev is guidance-distilled: Meng et al.'s stage 1
# is its own guidance input.
FLOW_TIER = ("sana", "sd35m", "flux1")
FLOW_OVERRIDES = {("meng", "flux1"): {"stage1_fraction": 0.0}}
FLOW_GROUPS = {("meng", "flux1"): {"progressive"}}  # no stage 1: its group never steps


@pytest.mark.parametrize("arch", FLOW_TIER)
@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_checkpoints_and_resumes_on_meta_on_a_flow_teacher(
        name, arch, tmp_path, monkeypatch):
    from components.planning.teachers import SpecBatches, flow_spec, spec_teacher

    spec = flow_spec(arch)

    def build():
        cfg_cls, factory = get_method(name)
        settings = {**OVERRIDES.get(name, {}), **FLOW_OVERRIDES.get((name, arch), {})}
        return factory(cfg_cls(**settings), spec_teacher(spec, "meta"), 2)

    _train_and_resume(build, SpecBatches(spec, "meta"), "bf16", tmp_path, monkeypatch,
                      FLOW_GROUPS.get((name, arch)))


def _train_and_resume(build, batches, precision: str, tmp_path, monkeypatch,
                      groups: set[str] | None = None) -> None:
    """Two iterations of a method on ``meta`` through the loop and policy, with a checkpoint at
    step 1 and a fresh run resuming from it: nothing leaves the device, the EMA is fp32 and
    every optimizer group (or those of ``groups``) steps."""
    store = MetaStore()
    store.install(monkeypatch, checkpoint)
    loop = LoopConfig(steps=1, batch_size=2, log_every=1, sample_every=100,
                      checkpoint_every=1)
    policy = PolicyConfig(precision=precision, activation_checkpointing=True)
    logs: list = []
    method = build()
    with MetaCache():
        train(method, batches, loop, tmp_path, lambda m, s: logs.append(m),
              lambda module, step: None, policy=TrainingPolicy(policy))
    for module_name, module in method.state_modules().items():
        assert not _on_meta(module), f"{module_name}: off the run's device: {_on_meta(module)}"
    # a fresh run resumes from step 1 and runs iteration 1 (the second phase, where there is one)
    resumed = build()
    loop2 = LoopConfig(**{**loop.__dict__, "steps": 2})
    with MetaCache():
        ema = train(resumed, batches, loop2, tmp_path, lambda m, s: logs.append(m),
                    lambda module, step: None, policy=TrainingPolicy(policy))
    # Adam's step counters are host scalars by design (torch.optim, not capturable)
    off = sorted(k for k, d in {**store.written, **store.loaded}.items()
                 if d != "meta" and not k.endswith("/step"))
    assert not off, f"{len(off)} checkpoint tensors off the meta device: {off[:5]}"
    if ema.enabled:
        assert any(k.startswith("ema/") for k in store.loaded)
        assert all(v.device.type == "meta" for v in ema.shadow.values())
        assert all(v.dtype == torch.float32 for v in ema.shadow.values()
                   if v.dtype.is_floating_point), "the EMA is kept in fp32"
    else:  # DMD2 keeps no average: the checkpoint holds none
        assert not any(k.startswith("ema/") for k in {**store.written, **store.loaded})
    assert len(logs) == 2 and {k.split("_")[0] for k in logs[1]} >= {"dropped"}
    groups = groups or {g.name for g in method.groups}
    assert {k[len("dropped_"):] for log in logs for k in log if k.startswith("dropped_")} == groups


# peft moves the LoRA layers it adds with Module.to, and torch 2.13 applies Module.to to
# FakeTensor parameters only by swap_tensors, which refuses them ("Cannot swap t1 because it has
# weakref associated with it"); SwiftBrush's student itself generates in tests/test_fake_cuda.py
FAKE_OPEN = {"swiftbrush": "open: peft's Module.to of new LoRA layers cannot swap FakeTensor "
                           "parameters in torch 2.13 (weakref); the student generator kind runs "
                           "on fake cuda in tests/test_fake_cuda.py"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=FAKE_OPEN[m]))
    if m in FAKE_OPEN else m for m in method_names()])
def test_every_student_generates_on_fake_cuda(name, arch):
    """Forward only: the method built on fake CUDA tensors at full size, and its student's
    sampler. Copies of fake networks go through ``FakeCopyMode`` (torch's deepcopy for fake
    tensors: a plain deepcopy would give them another fake mode, "Mixing fake modes")."""
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        teacher = _teacher(arch, device="cuda")
        cfg_cls, factory = get_method(name)
        with FakeCopyMode(mode):
            method = factory(cfg_cls(**OVERRIDES.get(name, {})), teacher, 2)
        for module_name, module in method.state_modules().items():
            off = [n for n, p in module.named_parameters() if p.device.type != "cuda"]
            assert not off, f"{module_name} off the teacher's device: {off[:3]}"
        z = torch.zeros(2, 4, 8, 8, device="cuda")
        with torch.no_grad():
            out = generate_latents(method.student(), z, _cond(arch, 2, "cuda"), method.spec)
        assert out.device.type == "cuda" and out.shape == z.shape
