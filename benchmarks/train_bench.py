"""Training-throughput benchmark of the xmodal networks.

Measures samples/s and peak memory of

* ``fimg``     – ResNet18 forward + backward on a batch of grayscale images,
* ``fp-fast``  – DGCNN (fast EdgeConv) forward + backward on a batch of point clouds,
* ``fp-ref``   – the same with the reference EdgeConv (same weights),
* ``step``     – one full self-supervised step (Algorithm 1): 3 images + 1 cloud per sample
                 through Fimg / Fp / Ff, triplet + cross-modal loss, backward, SGD step,

and, when asked for with ``--configs`` (not in the default set), two paired measurements: each
times two variants alternately in the same process(es) (order A B, B A, ...), so that the load of a
shared machine hits both alike, and reports both rows plus the median of the per-round time ratios:

* ``fp-bf16`` – ``fp-fast`` under ``torch.autocast`` in bfloat16 (row ``fp-bf16``) against the same
                model and input in float32 (row ``fp-f32``),
* ``fp-compile`` – ``fp-fast`` (BatchNorm on batch statistics, running statistics updated, as in
                the ``paper`` preset) eagerly (row ``fp-eager``) and through ``torch.compile`` (row
                ``fp-compile``), the same module and input; compilation is paid in the warm-up,
* ``ddp``     – one DistributedDataParallel step of Fp (forward, backward with the gradient
                all-reduce, SGD step) on 2 processes (gloo on CPU, 1 thread each, the batch split
                between them): fused EdgeConv with its BatchNorm statistics reduced over both
                processes (row ``ddp-fused``) against the reference EdgeConv with
                ``GlobalBatchNorm`` (SyncBatchNorm on CUDA; row ``ddp-ref``),
* ``cpu-step`` – the trainer's own step of the ``cpu`` preset (frozen Fp BatchNorm) in four
                variants timed round-robin, each against ``before`` (the step as it was: fixed
                BatchNorm statistics through the general fused function, eager): ``fold`` (BN1
                folded into the per-point terms), ``fold+compile`` (plus ``torch.compile``) and
                ``fold+compile+bf16`` (plus CPU bf16 autocast); the two compiled variants pay their
                compilation during the warm-up,

at the sizes of ``SIZES``: ``paper`` (batch 32, 2048 points, 224 px), ``cpu`` (batch 16, 1024
points, 64 px), ``fp32`` (batch 32, 1024 points, 64 px), all with k=20, and ``cpu-preset`` (batch
16, 512 points, 64 px, k=16: the ``cpu`` training preset); ``custom`` takes ``--batch``,
``--points``, ``--image-size`` and ``--k``. Before timing, ``fp-fast`` and ``fp-ref`` are run once on the
same input with the same weights (in ``--check-dtype``, float64 by default) and the max abs
difference of their outputs and parameter gradients is printed. In float32 the two can differ
visibly at this size: round-off of ~1e-6 in a block's output flips near-tied kNN neighbours of
the next block (dozens of points among 32k), which changes those points' features; in float64
the graphs agree and the outputs match to ~1e-13.
The required figure is the Fp forward+backward speed-up of fast over reference on CPU at
batch 32 with 1,024 points (``--size fp32``, which is batch 32 / 1024 points / 64 px).

Memory: each configuration runs in a fresh subprocess. On CPU the peak is the growth of the
process's maximum resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a
high-water mark) from just before the first (warm-up) iteration -- models, optimiser and inputs
already built -- to the end, i.e. the extra memory a training iteration needs (activations,
gradients, optimiser state, temporaries).
``tracemalloc`` cannot see torch's allocations, hence RSS. On CUDA it is
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` (same window).

Times are the median over ``--repeats`` timed iterations after ``--warmup`` untimed ones. On a
shared machine the numbers are noisy; fast and reference run back to back for comparability (the
paired configurations interleave theirs; their peak memory is that of the pair together).

Usage::

    python benchmarks/train_bench.py --size cpu --repeats 3
    python benchmarks/train_bench.py --size fp32 --configs fp-fast fp-ref --repeats 2
    python benchmarks/train_bench.py --size paper --device cuda
    python benchmarks/train_bench.py --size cpu-preset fp32 --configs fp-bf16 --repeats 6
    python benchmarks/train_bench.py --size cpu-preset --configs ddp --repeats 6
    python benchmarks/train_bench.py --size cpu-preset --configs fp-compile --repeats 10 --warmup 3
    python benchmarks/train_bench.py --size cpu-preset --configs cpu-step --repeats 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "paper": dict(batch=32, points=2048, image_size=224, k=20),
    "cpu": dict(batch=16, points=1024, image_size=64, k=20),
    "fp32": dict(batch=32, points=1024, image_size=64, k=20),
    "cpu-preset": dict(batch=16, points=512, image_size=64, k=16),
}
DEFAULT_CONFIGS = ("fimg", "fp-fast", "fp-ref", "step")
CONFIGS = (*DEFAULT_CONFIGS, "fp-bf16", "fp-compile", "ddp", "cpu-step")
#: the variants of ``cpu-step``: (fold fixed BatchNorm statistics, torch.compile, amp)
CPU_STEP_VARIANTS = {
    "before": (False, False, "off"),
    "fold": (True, False, "off"),
    "fold+compile": (True, True, "off"),
    "fold+compile+bf16": (True, True, "bf16"),
}


def _maxrss_mib() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(config: str, batch: int, points: int, image_size: int, k: int, device, seed: int):
    """Return a closure running one training iteration of ``config`` (``fp-bf16``: a dict of two,
    ``{"fp-f32": ..., "fp-bf16": ...}``; not ``ddp``)."""
    import torch

    from xmodal.losses import self_supervised_loss
    from xmodal.models.dgcnn import DGCNN
    from xmodal.models.heads import PairClassifier
    from xmodal.models.resnet import resnet18

    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, 1, image_size, image_size, generator=g).to(device)
    pts = torch.randn(batch, points, 3, generator=g).to(device)

    if config == "fimg":
        model = resnet18().to(device).train()

        def it():
            model.zero_grad(set_to_none=True)
            model(imgs).sum().backward()

        return it
    if config in ("fp-fast", "fp-ref", "fp-bf16"):
        torch.manual_seed(seed)
        model = DGCNN(k=k, fast=config != "fp-ref").to(device).train()

        def fp_iteration(amp: bool):
            def it():
                model.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(pts)
                out.float().sum().backward()

            return it

        return {"fp-f32": fp_iteration(False), "fp-bf16": fp_iteration(True)} if config == "fp-bf16" else fp_iteration(False)
    if config == "fp-compile":
        torch.manual_seed(seed)
        model = DGCNN(k=k).to(device).train()
        compiled = torch.compile(model)

        def fp_step(net):
            def it():
                model.zero_grad(set_to_none=True)
                net(pts).sum().backward()

            return it

        return {"fp-eager": fp_step(model), "fp-compile": fp_step(compiled)}
    if config == "step":
        torch.manual_seed(seed)
        fimg, fp, ff = resnet18().to(device), DGCNN(k=k).to(device), PairClassifier().to(device)
        params = [*fimg.parameters(), *fp.parameters(), *ff.parameters()]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
        views = torch.randn(3 * batch, 1, image_size, image_size, generator=g).to(device)  # img1|img2|img3
        labels = torch.tensor([[1, 1, 0]], device=device).expand(batch, 3)

        def it():
            opt.zero_grad(set_to_none=True)
            fi = fimg(views).view(3, batch, -1)  # one batched pass over the 3B images
            fpt = fp(pts)
            logits = torch.stack([ff(fi[j], fpt) for j in range(3)], dim=1)  # (B, 3, 2)
            out = self_supervised_loss(fi[0], fi[1], fi[2], logits, labels, margin=1.0, beta=1.0)
            out["loss"].backward()
            opt.step()

        return it
    if config == "cpu-step":
        return _cpu_step_variants(batch, points, image_size, k, device, seed)
    raise ValueError(f"unknown config {config!r}; choose from {CONFIGS}")


def _cpu_step_variants(batch: int, points: int, image_size: int, k: int, device, seed: int) -> dict:
    """One full training step of the ``cpu`` preset (the trainer's own Stepper: 3B images through
    Fimg, B clouds through Fp with frozen BatchNorm, Ff, losses, SGD) in each variant of
    :data:`CPU_STEP_VARIANTS`, on one synthetic batch; the learning rate is tiny so that repeated
    steps on the same batch stay finite (the cost of a step does not depend on it)."""
    import numpy as np
    import torch

    from xmodal.config import resolve
    from xmodal.models.dgcnn import EdgeConv
    from xmodal.train.config import PretrainConfig
    from xmodal.train.distributed import DistContext
    from xmodal.train.model import autocast_dtype, build_optimizer, build_training_model
    from xmodal.train.step import Stepper

    rng = np.random.default_rng(seed)
    b = batch
    data = {
        "images": torch.from_numpy(rng.integers(0, 256, (3, b, image_size, image_size), dtype=np.uint8)),
        "boxes": torch.tensor([[0.05, 0.05, 0.9, 0.9]]).repeat(3, b, 1),
        "flip": torch.zeros(3, b, dtype=torch.bool),
        "points": torch.from_numpy(rng.normal(size=(b, points, 3)).astype(np.float32) / 2),
        "labels": torch.tensor([[1, 1, 0]]).repeat(b, 1),
        "objects": torch.arange(b),
        "negatives": (torch.arange(b) + 1) % b + b,
    }
    ctx = DistContext(device=device)

    def variant(fold: bool, compile_: bool, amp: str):
        cfg = resolve(PretrainConfig, "cpu", [f"batch_size={b}", f"data.num_points={points}", f"data.image_size={image_size}",
                                              f"model.k={k}", "optim.lr=1e-9", f"amp={amp}", f"device={device.type}"],
                      group="pretrain")
        net = build_training_model(cfg, ctx)
        for m in net.modules():
            if isinstance(m, EdgeConv):
                m.fold_fixed_bn = fold
        opt, sched = build_optimizer(cfg, net)
        stepper = Stepper(torch.compile(net) if compile_ else net, cfg, ctx, opt, sched, autocast_dtype(amp, device))
        count = [0]

        def it():
            count[0] += 1
            stepper(data, count[0])

        return it

    return {name: variant(*spec) for name, spec in CPU_STEP_VARIANTS.items()}


def _measure(its: dict, device, warmup: int, repeats: int, before=None) -> dict:
    """Time the callables ``its`` (name -> iteration): ``warmup`` untimed calls each, then
    ``repeats`` rounds calling each once, in reversed order every other round; ``before`` runs
    untimed ahead of each timed call. Returns per name the median / min seconds, the peak memory
    they add together (see the module docstring), and with two names ``pair_ratio``: the median
    over rounds of second / first."""
    import torch

    names = list(its)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = _maxrss_mib()  # models, optimiser and inputs are built; no iteration has run yet
    for _ in range(warmup):
        for name in names:
            its[name]()
    _sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if before is not None:
                before()
            t0 = time.perf_counter()
            its[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = _maxrss_mib() - base_rss
    res = {name: dict(seconds=statistics.median(t), min_seconds=min(t), peak_mib=peak,
                      threads=torch.get_num_threads()) for name, t in times.items()}
    for name in names[1:]:  # each against the first, round by round
        ratio = statistics.median(b / a for a, b in zip(times[names[0]], times[name]))
        res[name]["pair_ratio"] = ratio
    return res


def _rows(res: dict, args) -> list[dict]:
    return [dict(config=name, batch=args.batch, points=args.points, image_size=args.image_size, k=args.k,
                 samples_per_s=args.batch / r["seconds"], **r) for name, r in res.items()]


def worker(args) -> list[dict]:
    """Run one configuration in this process; return its measurements (one row, two when paired)."""
    import torch

    if args.config == "ddp":
        return ddp_worker(args)
    device = torch.device(args.device)
    its = _build(args.config, args.batch, args.points, args.image_size, args.k, device, args.seed)
    its = its if isinstance(its, dict) else {args.config: its}
    return _rows(_measure(its, device, args.warmup, args.repeats), args)


def _ddp_rank(rank: int, args, store: str, out: str) -> None:
    """One of the 2 processes of :func:`ddp_worker`: DDP steps of the fused and of the reference
    Fp (same weights) on this process's half of the batch, interleaved."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from xmodal.models.dgcnn import DGCNN
    from xmodal.train.distributed import convert_batchnorm

    torch.set_num_threads(1)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", init_method=f"file://{store}",
                            rank=rank, world_size=2)
    local = args.batch // 2
    pts = torch.randn(args.batch, args.points, 3, generator=torch.Generator().manual_seed(args.seed))
    pts = pts[rank * local : (rank + 1) * local].to(device)

    def ddp_step(fast: bool):
        torch.manual_seed(args.seed)
        model = convert_batchnorm(DGCNN(k=args.k, fast=fast), device, 2).to(device).train()
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

        def it():
            opt.zero_grad(set_to_none=True)
            ddp(pts).sum().backward()
            opt.step()

        return it

    its = {"ddp-fused": ddp_step(True), "ddp-ref": ddp_step(False)}
    res = _measure(its, device, args.warmup, args.repeats, before=dist.barrier)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def ddp_worker(args) -> list[dict]:
    """``ddp``: 2 processes (``torch.multiprocessing``); rank 0's figures."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        store, out = str(Path(tmp) / "store"), str(Path(tmp) / "rank0.json")
        mp.spawn(_ddp_rank, args=(args, store, out), nprocs=2, join=True)
        res = json.loads(Path(out).read_text())
    return [dict(row, processes=2) for row in _rows(res, args)]


def check(args) -> dict:
    """Fast vs reference DGCNN on the same input and weights (train mode): max abs differences."""
    import torch

    from xmodal.models.dgcnn import DGCNN

    device = torch.device(args.device)
    dtype = getattr(torch, args.check_dtype)
    torch.manual_seed(args.seed)
    ref = DGCNN(k=args.k, fast=False).to(device, dtype)
    fast = DGCNN(k=args.k, fast=True).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(args.batch, args.points, 3, generator=torch.Generator().manual_seed(args.seed))
    x = x.to(device, dtype)
    yr, yf = ref(x), fast(x)
    yr.sum().backward()
    yf.sum().backward()
    gdiff = max((a.grad - b.grad).abs().max().item() / max(1.0, a.grad.abs().max().item())
                for a, b in zip(ref.parameters(), fast.parameters()))
    return dict(out_max_abs_diff=(yr - yf).abs().max().item(), out_max_abs=yr.abs().max().item(),
                grad_max_rel_diff=gdiff)


def _spawn(args, mode: str, config: str, size: dict):
    """Run ``--_worker mode`` for ``config`` at ``size`` in a fresh process; its JSON answer (a dict
    for "check", a list of rows for "time")."""
    cmd = [sys.executable, __file__, "--_worker", mode, "--config", config, "--device", args.device,
           "--repeats", str(args.repeats), "--check-dtype", args.check_dtype, "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--batch", str(size["batch"]), "--points", str(size["points"]), "--image-size", str(size["image_size"]),
           "--k", str(size["k"])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {mode}/{config} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ratio_lines(by: dict, name: str) -> list[str]:
    """The comparisons within one size's rows ``by`` (config -> row) that the run has both sides of."""
    lines = []
    if "fp-fast" in by and "fp-ref" in by:
        f, r = by["fp-fast"], by["fp-ref"]
        lines.append(f"[{name}] Fp forward+backward speed-up fast/reference: "
                     f"{r['seconds'] / f['seconds']:.2f}x (median), {r['min_seconds'] / f['min_seconds']:.2f}x (min); "
                     f"peak memory {r['peak_mib']:.0f} -> {f['peak_mib']:.0f} MiB")
    if "fp-f32" in by and "fp-bf16" in by:
        f, b = by["fp-f32"], by["fp-bf16"]
        lines.append(f"[{name}] Fp forward+backward (fused), interleaved: float32 {f['seconds']:.3f} s/it, bf16 "
                     f"autocast {b['seconds']:.3f} s/it; bf16 / float32 time {b['pair_ratio']:.2f} (median of "
                     f"per-round ratios)")
    if "fp-eager" in by and "fp-compile" in by:
        e, c = by["fp-eager"], by["fp-compile"]
        lines.append(f"[{name}] Fp forward+backward (fused, batch statistics), interleaved: eager {e['seconds']:.3f} s/it, "
                     f"torch.compile {c['seconds']:.3f} s/it; speed-up {1 / c['pair_ratio']:.2f}x (median of "
                     f"per-round ratios)")
    if "before" in by:
        base = by["before"]
        for variant in list(CPU_STEP_VARIANTS)[1:]:
            if variant in by:
                v = by[variant]
                lines.append(f"[{name}] cpu-preset training step, interleaved: before {base['seconds']:.3f} s/step, "
                             f"{variant} {v['seconds']:.3f} s/step; speed-up {1 / v['pair_ratio']:.2f}x (median of "
                             f"per-round ratios)")
    if "ddp-fused" in by and "ddp-ref" in by:
        f, r = by["ddp-fused"], by["ddp-ref"]
        lines.append(f"[{name}] Fp DDP step on 2 processes, interleaved: fused {f['seconds']:.3f} s/step, reference "
                     f"{r['seconds']:.3f} s/step; reference / fused time {r['pair_ratio']:.2f} (median of "
                     f"per-round ratios)")
    return lines


def _report(rows: list[dict], args) -> None:
    print(f"\ndevice={args.device} repeats={args.repeats} warmup={args.warmup} "
          f"threads={rows[0]['threads'] if rows else '?'} (ddp-*: 2 processes x 1 thread each)")
    hdr = (f"{'size':<11}{'config':<18}{'batch':>6}{'points':>7}{'k':>4}{'px':>5}{'s/it':>9}{'min s':>9}"
           f"{'samples/s':>11}{'peak MiB':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['size']:<11}{r['config']:<18}{r['batch']:>6}{r['points']:>7}{r['k']:>4}{r['image_size']:>5}"
              f"{r['seconds']:>9.3f}{r['min_seconds']:>9.3f}{r['samples_per_s']:>11.2f}{r['peak_mib']:>10.0f}")
    for name in args.size:
        for line in _ratio_lines({r["config"]: r for r in rows if r["size"] == name}, name):
            print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=[*SIZES, "custom"], nargs="+", default=["cpu"],
                    help="preset sizes to run (custom = --batch/--points/--image-size/--k)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=20, help="DGCNN neighbours (custom size)")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip the fast-vs-reference output check")
    ap.add_argument("--check-dtype", choices=["float64", "float32"], default="float64",
                    help="dtype of the fast-vs-reference check (float32 differs through kNN near-ties)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--_worker", choices=["time", "check"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        out = worker(args) if args._worker == "time" else check(args)
        print(json.dumps(out))
        return 0

    rows, checks = [], {}
    for name in args.size:
        size = SIZES.get(name) or dict(batch=args.batch, points=args.points, image_size=args.image_size, k=args.k)
        if not args.no_check and {"fp-fast", "fp-ref"} <= set(args.configs):
            checks[name] = _spawn(args, "check", "fp", size)
            c = checks[name]
            print(f"[{name}] fast vs reference DGCNN ({args.check_dtype}): max |out diff| = {c['out_max_abs_diff']:.3g} "
                  f"(max |out| {c['out_max_abs']:.3g}); max relative param-grad diff = {c['grad_max_rel_diff']:.3g}",
                  flush=True)
        for cfg in args.configs:
            for r in _spawn(args, "time", cfg, size):
                r["size"] = name
                rows.append(r)
                print(f"  done {name}/{r['config']}: {r['seconds']:.3f} s/it", file=sys.stderr, flush=True)
    _report(rows, args)
    if args.json:
        from xmodal.utils.io import write_json

        write_json(args.json, {"rows": rows, "checks": checks, "device": args.device})
    return 0


if __name__ == "__main__":
    sys.exit(main())
