"""Training-throughput benchmark of the xmodal networks.

Measures samples/s and peak memory of

* ``fimg``     – ResNet18 forward + backward on a batch of grayscale images,
* ``fp-fast``  – DGCNN (fast EdgeConv) forward + backward on a batch of point clouds,
* ``fp-ref``   – the same with the reference EdgeConv (same weights),
* ``step``     – one full self-supervised step (Algorithm 1): 3 images + 1 cloud per sample
                 through Fimg / Fp / Ff, triplet + cross-modal loss, backward, SGD step,

at two sizes: ``paper`` (batch 32, 2048 points, 224 px) and ``cpu`` (batch 16, 1024 points,
64 px; all three are arguments). Before timing, ``fp-fast`` and ``fp-ref`` are run once on the
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
shared machine the numbers are noisy; fast and reference run back to back for comparability.

Usage::

    python benchmarks/train_bench.py --size cpu --repeats 3
    python benchmarks/train_bench.py --size fp32 --configs fp-fast fp-ref --repeats 2
    python benchmarks/train_bench.py --size paper --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    "paper": dict(batch=32, points=2048, image_size=224),
    "cpu": dict(batch=16, points=1024, image_size=64),
    "fp32": dict(batch=32, points=1024, image_size=64),
}
CONFIGS = ("fimg", "fp-fast", "fp-ref", "step")


def _maxrss_mib() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(config: str, batch: int, points: int, image_size: int, device, seed: int):
    """Return a closure running one training iteration of ``config``."""
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
    if config in ("fp-fast", "fp-ref"):
        torch.manual_seed(seed)
        model = DGCNN(fast=config == "fp-fast").to(device).train()

        def it():
            model.zero_grad(set_to_none=True)
            model(pts).sum().backward()

        return it
    if config == "step":
        torch.manual_seed(seed)
        fimg, fp, ff = resnet18().to(device), DGCNN().to(device), PairClassifier().to(device)
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
    raise ValueError(f"unknown config {config!r}; choose from {CONFIGS}")


def worker(args) -> dict:
    """Run one configuration in this process; return its measurements."""
    import torch

    device = torch.device(args.device)
    it = _build(args.config, args.batch, args.points, args.image_size, device, args.seed)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = _maxrss_mib()  # models, optimiser and inputs are built; no iteration has run yet
    for _ in range(args.warmup):
        it()
    _sync(device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        it()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = _maxrss_mib() - base_rss
    med = statistics.median(times)
    return dict(config=args.config, batch=args.batch, points=args.points, image_size=args.image_size,
                seconds=med, min_seconds=min(times), samples_per_s=args.batch / med, peak_mib=peak,
                threads=torch.get_num_threads())


def check(args) -> dict:
    """Fast vs reference DGCNN on the same input and weights (train mode): max abs differences."""
    import torch

    from xmodal.models.dgcnn import DGCNN

    device = torch.device(args.device)
    dtype = getattr(torch, args.check_dtype)
    torch.manual_seed(args.seed)
    ref = DGCNN(fast=False).to(device, dtype)
    fast = DGCNN(fast=True).to(device, dtype)
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


def _spawn(args, mode: str, config: str, size: dict) -> dict:
    cmd = [sys.executable, __file__, "--_worker", mode, "--config", config, "--device", args.device,
           "--repeats", str(args.repeats), "--check-dtype", args.check_dtype, "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--batch", str(size["batch"]), "--points", str(size["points"]), "--image-size", str(size["image_size"])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {mode}/{config} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=[*SIZES, "custom"], nargs="+", default=["cpu"],
                    help="preset sizes to run (custom = --batch/--points/--image-size)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
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
        size = SIZES.get(name) or dict(batch=args.batch, points=args.points, image_size=args.image_size)
        if not args.no_check and {"fp-fast", "fp-ref"} <= set(args.configs):
            checks[name] = _spawn(args, "check", "fp", size)
            c = checks[name]
            print(f"[{name}] fast vs reference DGCNN ({args.check_dtype}): max |out diff| = {c['out_max_abs_diff']:.3g} "
                  f"(max |out| {c['out_max_abs']:.3g}); max relative param-grad diff = {c['grad_max_rel_diff']:.3g}",
                  flush=True)
        for cfg in args.configs:
            r = _spawn(args, "time", cfg, size)
            r["size"] = name
            rows.append(r)
            print(f"  done {name}/{cfg}: {r['seconds']:.3f} s/it", file=sys.stderr, flush=True)

    print(f"\ndevice={args.device} repeats={args.repeats} warmup={args.warmup} threads={rows[0]['threads'] if rows else '?'}")
    hdr = f"{'size':<7}{'config':<9}{'batch':>6}{'points':>7}{'px':>5}{'s/it':>9}{'min s':>9}{'samples/s':>11}{'peak MiB':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['size']:<7}{r['config']:<9}{r['batch']:>6}{r['points']:>7}{r['image_size']:>5}"
              f"{r['seconds']:>9.3f}{r['min_seconds']:>9.3f}{r['samples_per_s']:>11.2f}{r['peak_mib']:>10.0f}")
    for name in args.size:
        by = {r["config"]: r for r in rows if r["size"] == name}
        if "fp-fast" in by and "fp-ref" in by:
            print(f"[{name}] Fp forward+backward speed-up fast/reference: "
                  f"{by['fp-ref']['seconds'] / by['fp-fast']['seconds']:.2f}x (median), "
                  f"{by['fp-ref']['min_seconds'] / by['fp-fast']['min_seconds']:.2f}x (min); "
                  f"peak memory {by['fp-ref']['peak_mib']:.0f} -> {by['fp-fast']['peak_mib']:.0f} MiB")
    if args.json:
        from xmodal.utils.io import write_json

        write_json(args.json, {"rows": rows, "checks": checks, "device": args.device})
    return 0


if __name__ == "__main__":
    sys.exit(main())
