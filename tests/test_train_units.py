"""Model, LARS, schedules, EMA, config, distributed environment, checkpoints, phase timer."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from mveb.errors import UsageError
from train.checkpoint import checkpoints, latest_checkpoint, load_checkpoint, load_latest, save_checkpoint
from train.config import Config, check_config, get_config
from train.distributed import _env_ranks, init_distributed, planned_world_size, rendezvous_env
from train.lars import LARS, lars_param_groups
from train.model import Encoder, ema_update, momentum_copy
from train.phases import PhaseTimer
from train.schedules import ema_momentum, learning_rate, scaled_lr

# ---- schedules: the literal formulas of DESIGN.md "Training recipe"


@pytest.mark.parametrize("peak,W,T", [(4.8, 10 * 312, 800 * 312), (0.1, 7, 50), (1.0, 0, 20)])
def test_learning_rate_is_the_literal_formula(peak: float, W: int, T: int) -> None:
    lo = 1e-3 * peak
    for s in sorted({0, 1, W // 2, max(W - 1, 0), W, W + 1, T // 2, T - 1, T}):
        want = lo + (peak - lo) * s / W if s < W else lo + (peak - lo) * (1 + math.cos(math.pi * (s - W) / T)) / 2
        assert learning_rate(s, peak, W, T) == pytest.approx(want, rel=1e-12, abs=0)
    if W:
        assert learning_rate(0, peak, W, T) == pytest.approx(lo)
        assert learning_rate(W, peak, W, T) == pytest.approx(peak)
    # cosine over T, not T - W: the last step is a hair above min (exactly min only when W = 0)
    assert learning_rate(T, peak, W, T) >= lo
    if W:
        assert learning_rate(T, peak, W, T) > lo * (1 + 1e-9)


def test_ema_momentum_is_the_literal_formula() -> None:
    T = 1000
    for s in (0, 1, 250, 500, 999, 1000):
        assert ema_momentum(s, 0.996, T) == pytest.approx(1 - (1 - 0.996) * (math.cos(math.pi * s / T) + 1) / 2, abs=1e-15)
    assert ema_momentum(0, 0.996, T) == pytest.approx(0.996)
    assert ema_momentum(T, 0.996, T) == pytest.approx(1.0)


def test_lr_scaling_rule() -> None:
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)


# ---- LARS: foreach version against the plain per-parameter algorithm


def _plain_lars_step(params: list[nn.Parameter], bufs: dict, lr: float, wd: float, mom: float, trust: float) -> None:
    with torch.no_grad():
        for p in params:
            d = p.grad.clone()
            if p.ndim > 1:
                d = d + wd * p
                pn, dn = p.norm(), d.norm()
                q = trust * pn / dn if pn > 0 and dn > 0 else torch.tensor(1.0)
                d = d * q
            b = bufs.setdefault(p, torch.zeros_like(p))
            b.mul_(mom).add_(d)
            p.sub_(lr * b)


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5),
                        nn.Linear(5, 4, bias=False))
    with torch.no_grad():
        net[5].weight.zero_()  # a zero-norm weight takes the trust = 1 branch
    return net


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_lars_matches_plain_per_parameter_lars_step_by_step(layout: torch.memory_format) -> None:
    """Also with the trainer's channels_last conv kernels, which LARS hands to the fused kernel
    as permuted views: the same values, updated in place, with no copy per step."""
    a, b = _small_net().to(memory_format=layout), _small_net()
    opt = LARS(lars_param_groups(a.parameters()), lr=0.5, weight_decay=1e-2, momentum=0.9, trust_coefficient=0.02)
    pb, bufs = list(b.parameters()), {}
    assert len(opt.param_groups[0]["params"]) == 3 and len(opt.param_groups[1]["params"]) == 4  # ndim<=1 excluded
    for step in range(6):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for net in (a, b):
            net.zero_grad()
            (net(x.contiguous(memory_format=layout) if net is a else x) - 1).pow(2).sum().backward()
        lr = 0.05 * (step + 1) / 6
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        assert not [e.name for e in prof.events() if e.name in ("aten::contiguous", "aten::clone")]
        _plain_lars_step(pb, bufs, lr, 1e-2, 0.9, 0.02)
        for pa, pp in zip(a.parameters(), pb):
            torch.testing.assert_close(pa, pp, rtol=1e-5, atol=1e-6)
    assert a[0].weight.is_contiguous(memory_format=layout)
    assert a[5].weight.abs().sum() > 0  # the zero-init layer moved


def test_lars_found_inf_skips_on_the_device_and_the_next_step_is_the_plain_one() -> None:
    a, b = _small_net(), _small_net()
    opt = LARS(lars_param_groups(a.parameters()), lr=0.3, weight_decay=1e-2, momentum=0.9, trust_coefficient=0.02)
    pb, bufs = list(b.parameters()), {}

    def backward(step: int) -> None:
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for net in (a, b):
            net.zero_grad()
            (net(x) - 1).pow(2).sum().backward()

    backward(0)
    opt.step(found_inf=torch.tensor(0.0))
    _plain_lars_step(pb, bufs, 0.3, 1e-2, 0.9, 0.02)
    before = [p.detach().clone() for p in a.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in a.parameters()]
    backward(1)
    next(a.parameters()).grad[0] = float("nan")
    opt.step(found_inf=torch.tensor(1.0))  # what the trainer passes for a non-finite step
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(a.parameters(), momentum))
    backward(2)
    opt.step(found_inf=torch.tensor(0.0))
    _plain_lars_step(pb, bufs, 0.3, 1e-2, 0.9, 0.02)
    for pa, pp in zip(a.parameters(), pb):
        torch.testing.assert_close(pa, pp, rtol=1e-5, atol=1e-6)


def test_lars_under_a_grad_scaler_takes_its_flag_without_a_host_read() -> None:
    """fp16 steps: GradScaler hands LARS its non-finite flag as a tensor (no .item() on the
    flag, which the profiler would show as aten::_local_scalar_dense); a finite step equals
    plain LARS on the unscaled gradients, a non-finite one changes nothing and halves the scale."""
    a, b = _small_net(), _small_net()
    opt = LARS(lars_param_groups(a.parameters()), lr=0.3, weight_decay=1e-2, momentum=0.9, trust_coefficient=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pb, bufs = list(b.parameters()), {}
    for step, poison in enumerate([False, True, False]):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for net in (a, b):
            net.zero_grad()
            loss = (net(x) - 1).pow(2).sum()
            (scaler.scale(loss) if net is a else loss).backward()
        if poison:
            next(a.parameters()).grad[0] = float("inf")
        before = [p.detach().clone() for p in a.parameters()]
        scaler.unscale_(opt)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            scaler.step(opt)
            scaler.update()
        assert "aten::_local_scalar_dense" not in {e.name for e in prof.events()}
        if poison:
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
            assert scaler.get_scale() == 512.0
        else:
            _plain_lars_step(pb, bufs, 0.3, 1e-2, 0.9, 0.02)
            for pa, pp in zip(a.parameters(), pb):
                torch.testing.assert_close(pa, pp, rtol=1e-5, atol=1e-6)
    scaler.scale(a(torch.randn(2, 3, 8, 8)).sum()).backward()
    with pytest.raises(RuntimeError, match="unscale_"):  # scaled gradients would give a wrong trust ratio
        scaler.step(opt)
    scaler.unscale_(opt)  # and the next, correct step goes through
    scaler.step(opt)
    scaler.update()


def test_lars_steps_right_when_buffers_and_grads_come_in_another_layout() -> None:
    """A momentum buffer restored in NCHW for a channels_last weight, or a gradient in another
    layout: the fused kernel walks raw memory, so LARS lays them out like the weight first."""
    # both channels_last, so both nets compute the same gradients and only LARS's handling differs
    a, b = (_small_net().to(memory_format=torch.channels_last) for _ in range(2))
    opt = LARS(lars_param_groups(a.parameters()), lr=0.5, weight_decay=1e-2, momentum=0.9, trust_coefficient=0.02)
    pb, bufs = list(b.parameters()), {}
    conv = a[0].weight
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for net in (a, b):
            net.zero_grad()
            (net(x) - 1).pow(2).sum().backward()
        if step:
            opt.state[conv]["momentum_buffer"] = opt.state[conv]["momentum_buffer"].contiguous()
            conv.grad = conv.grad.contiguous()
            assert not conv.grad.is_contiguous(memory_format=torch.channels_last)
        opt.step()
        _plain_lars_step(pb, bufs, 0.5, 1e-2, 0.9, 0.02)
        for pa, pp in zip(a.parameters(), pb):
            torch.testing.assert_close(pa, pp, rtol=1e-5, atol=1e-6)
    assert opt.state[conv]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)


def test_trainer_skips_a_non_finite_step_without_reading_it_back() -> None:
    from mveb.bench_step import synthetic_batch
    from train.distributed import DistInfo
    from train.step import Trainer

    torch.manual_seed(0)
    cfg = get_config("demo", ["data.batch_size=4", "data.global_size=32", "data.local_size=16"])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), False), 10)
    good = synthetic_batch(cfg, torch.device("cpu"), torch.float32)
    bad = synthetic_batch(cfg, torch.device("cpu"), torch.float32)
    bad.global_views[0, 0, 0, 0] = float("nan")
    trainer.step(good, 0)
    weights = [p.detach().clone() for p in trainer.online.parameters()]
    out = trainer.step(bad, 1)
    assert isinstance(out["skipped"], torch.Tensor) and bool(out["skipped"]) and trainer.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(trainer.online.parameters(), weights))
    out = trainer.step(good, 2)
    assert not bool(out["skipped"]) and trainer.skipped_steps == 1
    assert not torch.equal(next(trainer.online.parameters()), weights[0])
    assert trainer.state_dict()["skipped_steps"] == 1


def test_lars_state_round_trips() -> None:
    a = _small_net()
    opt = LARS(lars_param_groups(a.parameters()), lr=0.1)
    a(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    opt2 = LARS(lars_param_groups(a.parameters()), lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    p = next(a.parameters())
    torch.testing.assert_close(opt2.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


# ---- model and EMA


def test_encoder_keys_and_backbone_loads_into_torchvision() -> None:
    enc = Encoder("resnet18", 32, 16)
    keys = enc.state_dict().keys()
    assert all(k.startswith(("backbone.", "projector.")) for k in keys)
    backbone = {k.removeprefix("backbone."): v for k, v in enc.state_dict().items() if k.startswith("backbone.")}
    missing, unexpected = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    # zero-init residual: the last BN of every block starts at 0
    assert enc.backbone.layer1[0].bn2.weight.abs().sum() == 0
    lin = [m for m in enc.projector if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in lin] == [True, True, False]
    out = enc([torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)])
    assert [tuple(o.shape) for o in out] == [(4, 16), (6, 16)]


def test_ema_update_is_lerp_on_parameters_only() -> None:
    online = Encoder("resnet18", 16, 8)
    mom = momentum_copy(online)
    assert not any(p.requires_grad for p in mom.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in mom.parameters()]
    bn_before = mom.backbone.bn1.running_mean.clone()
    online.backbone.bn1.running_mean.add_(5)
    ema_update(mom, online, 0.9)
    for b, m, o in zip(before, mom.parameters(), online.parameters()):
        torch.testing.assert_close(m, 0.9 * b + 0.1 * o)
    torch.testing.assert_close(mom.backbone.bn1.running_mean, bn_before)


# ---- config


def test_presets_and_overrides() -> None:
    cfg = get_config("imagenet_rn50")
    assert (cfg.model.arch, cfg.data.batch_size, cfg.optim.base_lr, cfg.schedule.epochs) == ("resnet50", 128, 0.3, 800)
    assert (cfg.loss.lam, cfg.loss.eta, cfg.loss.min_tau, cfg.precision.amp) == (0.01, 0.01, 0.1, "bf16")
    assert cfg.data.recipe().n_views == 8
    cfg = get_config("demo", ["optim.base_lr=0.5", "steps=7", "model.per_view_forward=true", "data.n_local=0",
                              "schedule.steps=none"])
    assert cfg.optim.base_lr == 0.5 and cfg.model.per_view_forward is True and cfg.schedule.steps is None
    assert cfg.data.recipe().n_views == 2
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("override,message", [
    ("optim.no_such=1", "unknown config key 'optim.no_such'"),
    ("nothing=1", "unknown config key 'nothing'"),
    ("data.batch_size=lots", "cannot read 'lots' as int"),
    ("model.per_view_forward=maybe", "cannot read 'maybe' as bool"),
    ("optim.base_lr", "is not key=value"),
])
def test_bad_overrides_are_usage_errors(override: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        get_config("demo", [override])


def test_a_runs_config_json_is_a_config_to_override(tmp_path: Path) -> None:
    cfg = get_config("demo", ["optim.base_lr=0.7", "data.augment=flip_p=0", "monitor.knn_every_epochs=3"])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.to_dict()))
    assert get_config(str(saved)) == cfg
    assert get_config(str(saved), ["optim.base_lr=0.1"]).optim.base_lr == 0.1
    old = cfg.to_dict()
    del old["monitor"]  # a run saved before the group existed keeps the defaults for it
    saved.write_text(json.dumps(old))
    assert get_config(str(saved)).monitor.knn_every_epochs == 0


def test_a_runs_config_json_leaves_where_to_start_and_stop_to_this_invocation(tmp_path: Path) -> None:
    """A replay that kept the old --steps would stop at once; one that kept --resume none (or a
    checkpoint of another folder) would not resume from its own run folder after a requeue."""
    cfg = get_config("demo", ["schedule.steps=7", "run.resume=none", "data.global_batch_size=64"])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.to_dict()))
    again = get_config(str(saved))
    assert (again.schedule.steps, again.run.resume, again.data.global_batch_size) == (None, "auto", 64)
    assert get_config(str(saved), ["schedule.steps=3"]).schedule.steps == 3


@pytest.mark.parametrize("text,message", [
    (None, "No such file or directory"),
    ("{not json", "is not JSON"),
    ("[1, 2]", "is not a run's config.json"),
    ('{"optim": {"lr": 1}}', "unknown config key 'optim.lr'"),
])
def test_a_bad_config_json_is_a_usage_error(text: str | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        get_config(str(path))


def test_augment_override_sets_any_recipe_field_and_round_trips() -> None:
    cfg = get_config("demo", ["data.augment=global_scale=0.14:1, local_blur_p=0.3,global_solarize_p=0:0.5,flip_p=0"])
    r = cfg.data.recipe()
    assert (r.global_scale, r.local_blur_p, r.global_solarize_p, r.flip_p) == ((0.14, 1.0), 0.3, (0.0, 0.5), 0.0)
    assert (r.global_size, r.n_local, r.jitter_p) == (64, 2, 0.8)  # the preset's views, the paper's other values
    assert Config.from_dict(cfg.to_dict()).data.recipe() == r
    assert get_config("demo").data.recipe().global_scale == (0.4, 1.0)


@pytest.mark.parametrize("augment,message", [
    ("flip_p=1.5", "flip_p=1.5 is not a probability"),
    ("global_scale=0.5:2", "global_scale=(0.5, 2.0) is not a range 0 < lo <= hi <= 1"),
    ("global_blur_p=1", "global_blur_p needs one probability per global view (2)"),
    ("blur_sigma=2", "blur_sigma='2': expected 2 numbers joined by ':'"),
    ("hue=lots", "hue='lots': expected float"),
    ("hue=0.7", "0 <= hue <= 0.5"),
    ("n_local=4", "use key=value with a key among global_scale"),
    ("flip", "use key=value"),
])
def test_bad_augment_overrides_are_usage_errors_before_any_run(augment: str, message: str, tmp_path: Path) -> None:
    cfg = get_config("demo", [f"data.path={tmp_path}", f"data.augment={augment}"])
    with pytest.raises(UsageError, match=re.escape(message)):
        check_config(cfg, world_size=1)


# ---- distributed environment


def test_env_ranks_torchrun_then_slurm() -> None:
    assert _env_ranks({}) is None
    assert _env_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert _env_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "32", "SLURM_LOCALID": "5"}) == (5, 32, 5)
    # torchrun wins when both are set (torchrun inside an sbatch allocation)
    assert _env_ranks({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 2, 0)


def test_rendezvous_from_slurm_nodelist() -> None:
    if not any(os.access(os.path.join(d, "scontrol"), os.X_OK) for d in os.environ["PATH"].split(":")):
        pytest.skip("scontrol is not installed")
    env = rendezvous_env({"SLURM_JOB_NODELIST": "node[3-4],other7", "SLURM_JOB_ID": "12345"})
    assert env == {"MASTER_ADDR": "node3", "MASTER_PORT": str(20000 + 12345)}
    assert rendezvous_env({"MASTER_ADDR": "h", "MASTER_PORT": "1"}) == {}


def test_single_process_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_distributed) == (0, 1, False)
    assert planned_world_size() == 1


# ---- checkpoints


def test_checkpoint_keeps_last_two_and_loads_weights_only(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, {"step": step, "w": torch.full((3,), float(step))}, step)
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000010.pt", "step_00000015.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 15
    (tmp_path / "checkpoints" / "step_00000020.pt").write_bytes(b"garbage, not a checkpoint")
    path, state = load_latest(tmp_path)  # the broken newest one is reported and skipped
    assert path.name == "step_00000015.pt" and state["step"] == 15
    with pytest.raises(UsageError, match="cannot be read"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000020.pt")


def _write_big_checkpoint(run_dir: str) -> None:
    save_checkpoint(run_dir, {"step": 2, "w": torch.empty(64, 1024, 1024)}, 2)  # 256 MiB: slow enough to interrupt


def test_kill_during_checkpoint_write_keeps_previous(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(3)}, 1)
    proc = mp.get_context("fork").Process(target=_write_big_checkpoint, args=(str(tmp_path),))
    proc.start()
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.monotonic() + 60
    while not any(p.suffix == ".tmp" and p.stat().st_size > 0 for p in ckpt_dir.iterdir()):
        assert proc.is_alive() and time.monotonic() < deadline, "the writer never started its temporary file"
        time.sleep(0.001)
    os.kill(proc.pid, 9)  # mid-write: the temporary file exists, the final name does not
    proc.join()
    assert not (ckpt_dir / "step_00000002.pt").exists()
    path, state = load_latest(tmp_path)
    assert path.name == "step_00000001.pt" and state["step"] == 1
    save_checkpoint(tmp_path, {"step": 3}, 3)  # the next save clears the dead writer's temporary file
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000001.pt", "step_00000003.pt"]


# ---- phase timer


def test_phase_timer_cpu() -> None:
    t = PhaseTimer("cpu", enabled=True)
    with t("loss"):
        time.sleep(0.02)
    with t("loss"):
        time.sleep(0.01)
    assert 0.025 < t.totals()["loss"] < 0.5
    t.reset()
    assert t.totals() == {}
    off = PhaseTimer("cpu")
    with off("loss"):
        pass
    assert off.totals() == {}
