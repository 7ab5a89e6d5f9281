"""GPU check and benchmark, one command: ``python bench/gpu.py [--out DIR] [--budget SECONDS]``.

1. Checks the Triton kernels against the torch path on the GPU, on resnet50 and densenet121 layer sets
   (real activations and gradients of seeded random-weight models at 224), in fp32 and bf16.
2. Times the CAM maths (layer maps, quantile clamp, resampling; everything after the backward) with the
   Triton kernels and with the torch path, next to the backbone's bare forward + activation gradients, and
   reports the layer-map kernels' achieved bandwidth against a measured device-to-device copy.
3. Times end to end: uint8 frames in, heatmaps out (resize and normalise on the GPU, forward, backward, CAM
   maths), against the bare forward + backward, at batch 1, 8 and 64 in fp32 and bf16, for the eager and
   compiled backends (and ONNX Runtime's CUDA provider where onnxruntime-gpu is installed); plus 1080p
   frames in, blended 1080p overlays out.

Timings are medians over interleaved rounds (CUDA-synchronised wall clock). Prints markdown tables and
writes them, with the raw numbers, to ``DIR/gpu.md`` and ``DIR/gpu.json``. ``--budget`` skips what would
not fit. ``--smoke`` runs every code path on tiny inputs on the CPU (Triton interpreted), to test the script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wcam import Engine  # noqa: E402
from wcam.benchmark import floor  # noqa: E402
from wcam.benchmark.timing import interleaved, synchronise  # noqa: E402
from wcam.engine.capture import LayerCapture  # noqa: E402
from wcam.engine.explanation import combine  # noqa: E402
from wcam.engine.models import load_model  # noqa: E402
from wcam.kernels.dispatch import TorchKernels, TritonKernels  # noqa: E402
from wcam.kernels.frames import YUVFrames  # noqa: E402
from wcam.overlay import TURBO_LUT  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Report:
    """Markdown lines and raw records, printed as they come and written to ``out`` after each section."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[str] = []
        self.records: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str]) -> None:
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + " --- |" * len(header))

    def row(self, cells: list[object], **record: object) -> None:
        self.line("| " + " | ".join(str(c) for c in cells) + " |")
        if record:
            self.records.append(record)

    def save(self) -> None:
        (self.out / "gpu.md").write_text("\n".join(self.lines) + "\n")
        (self.out / "gpu.json").write_text(json.dumps(self.records, indent=1))


class Clock:
    """Synchronised, interleaved timing on one device (``wcam.benchmark.timing``); a budget in seconds for
    the whole run."""

    def __init__(self, device: torch.device, budget: float) -> None:
        self.device = device
        self.deadline = time.perf_counter() + budget

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        synchronise(self.device)

    def compare(self, fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2, inner: int = 1) -> dict[str, float]:
        """Median seconds per call of each function, timed in interleaved rounds (order rotated)."""
        times = interleaved(fns, rounds, warmup, self.device, inner=inner)
        return {name: statistics.median(values) for name, values in times.items()}


def capture(model: torch.nn.Module, layers: list[str], images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Activations and gradients of the argmax logit at ``layers`` (one forward, one backward)."""
    with LayerCapture(model, layers) as cap, torch.enable_grad():
        logits = model(images.detach().requires_grad_(True))
        acts = cap.collect()
        grads = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), acts)
    return [a.detach() for a in acts], list(grads)


def cam_maths(kernels: TorchKernels, acts: list[torch.Tensor], grads: list[torch.Tensor], size: tuple[int, int]):
    """Everything after the backward: layer maps, winsor weights at p = 90, weighted sum and normalisation."""
    maps = kernels.layer_maps(acts, grads)
    return maps, combine(maps, "winsor", 90.0, range(maps.num_layers), size, "bilinear", kernels)


def model_for(name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(name, weights=None).model.to(device=device, dtype=dtype)


def copy_bandwidth(clock: Clock, device: torch.device, size_mb: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(size_mb * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = clock.compare({"copy": lambda: dst.copy_(src)}, rounds=5, inner=10)["copy"]
    return 2 * src.numel() * 4 / seconds / 1e9


def check_kernels(report: Report, args, device: torch.device) -> None:
    report.line("## 1. Triton kernels vs the torch path on the GPU")
    report.line(f"Batch {args.check_batch}, {args.size}x{args.size}, p = 90, bilinear. Max abs difference; pass at 1e-3 "
                "(both paths read the same inputs and accumulate in fp32, so only summation order differs).")
    report.line("'CL maps': the Triton layer maps from channels-last copies of the same activations and gradients.")
    report.table(["model", "dtype", "layers", "layer maps", "scores", "weights", "heatmaps", "CL maps", "pass"])
    torch_k, triton_k = TorchKernels(), TritonKernels()
    for name in args.models:
        for label, dtype in DTYPES.items():
            model = model_for(name, dtype, device)
            engine = Engine(model, kernels="torch")
            images = torch.randn(args.check_batch, 3, args.size, args.size, device=device, dtype=dtype,
                                 generator=torch.Generator(device).manual_seed(0))
            acts, grads = capture(model, engine.layers, images)
            maps_t, (w_t, _, _, heat_t) = cam_maths(torch_k, acts, grads, (args.size, args.size))
            maps_k, (w_k, _, _, heat_k) = cam_maths(triton_k, acts, grads, (args.size, args.size))
            maps_cl = triton_k.layer_maps(*([x.contiguous(memory_format=torch.channels_last) for x in xs] for xs in (acts, grads)))
            map_diff = max(float((maps_t.groups[s][1] - maps_k.groups[s][1]).abs().max()) for s in maps_t.groups)
            cl_diff = max(float((maps_t.groups[s][1] - maps_cl.groups[s][1]).abs().max()) for s in maps_t.groups)
            diffs = [map_diff, float((maps_t.scores - maps_k.scores).abs().max()),
                     float((w_t - w_k).abs().max()), float((heat_t - heat_k).abs().max()), cl_diff]
            ok = all(d <= 1e-3 for d in diffs)
            report.row([name, label, len(acts), *(f"{d:.1e}" for d in diffs), "yes" if ok else "NO"],
                       section="check", model=name, dtype=label, diffs=diffs, ok=ok)
            del model, engine, acts, grads
    report.save()


def time_kernels(report: Report, args, device: torch.device, clock: Clock, copy_gbs: float) -> None:
    report.line()
    report.line("## 2. CAM maths: Triton kernels vs torch path, and vs the backbone")
    report.line(f"Device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written). 'maps GB/s' counts the bytes "
                "of every activation and gradient the layer-map kernels read once.")
    report.line("'CL': the same layer maps from channels-last copies of the activations and gradients (what a model "
                "converted to channels-last produces), Triton and torch: the kernels read pixels with a runtime "
                "stride, one pixel per thread, so there their loads are not coalesced.")
    report.table(["model", "dtype", "batch", "fwd+bwd ms", "torch CAM ms", "Triton CAM ms", "speed-up",
                  "CAM / fwd+bwd", "Triton maps ms", "maps GB/s", "% of copy", "Triton CL maps ms", "torch CL maps ms"])
    torch_k, triton_k = TorchKernels(), TritonKernels()
    for name in args.models:
        for label, dtype in DTYPES.items():
            model = model_for(name, dtype, device)
            layers = Engine(model, kernels="torch").layers
            bare = floor(model, layers)
            for batch in args.batches:
                if clock.left() < args.reserve:
                    report.line(f"(skipped {name} {label} batch {batch}: out of budget)")
                    continue
                images = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
                acts, grads = capture(model, layers, images)
                acts_cl, grads_cl = ([x.contiguous(memory_format=torch.channels_last) for x in xs] for xs in (acts, grads))
                size = (args.size, args.size)
                t = clock.compare({
                    "floor": lambda: bare(images),
                    "torch": lambda: cam_maths(torch_k, acts, grads, size),
                    "triton": lambda: cam_maths(triton_k, acts, grads, size),
                    "maps": lambda: triton_k.layer_maps(acts, grads),
                    "maps_cl": lambda: triton_k.layer_maps(acts_cl, grads_cl),
                    "torch_maps_cl": lambda: torch_k.layer_maps(acts_cl, grads_cl),
                }, rounds=args.rounds)
                nbytes = sum(a.numel() * a.element_size() + g.numel() * g.element_size() for a, g in zip(acts, grads))
                gbs = nbytes / t["maps"] / 1e9
                report.row([name, label, batch, f"{t['floor'] * 1e3:.2f}", f"{t['torch'] * 1e3:.2f}",
                            f"{t['triton'] * 1e3:.2f}", f"{t['torch'] / t['triton']:.1f}x",
                            f"{t['triton'] / t['floor']:.1%}", f"{t['maps'] * 1e3:.2f}", f"{gbs:.0f}",
                            f"{gbs / copy_gbs:.0%}", f"{t['maps_cl'] * 1e3:.2f}", f"{t['torch_maps_cl'] * 1e3:.2f}"],
                           section="kernels", model=name, dtype=label, batch=batch, seconds=t, bytes=nbytes)
                del acts, grads, acts_cl, grads_cl, images
            del model
            report.save()


SWEEP = [(8, 256, 16, 256, 8), (32, 64, 32, 64, 4), (16, 128, 16, 128, 4), (4, 512, 16, 128, 4), (8, 512, 8, 512, 8)]


def profile_kernels(report: Report, args, device: torch.device, clock: Clock) -> None:
    """Device time per kernel (torch.profiler), host time per call, and a tile-size sweep of the layer maps."""
    from torch.profiler import ProfilerActivity, profile

    from wcam.kernels.triton import layer_maps as maps_op

    report.line()
    report.line("## 2b. Where the Triton CAM time goes (resnet50)")
    kernels = TritonKernels()
    size = (args.size, args.size)
    for label in args.profile_dtypes:
        model = model_for("resnet50", DTYPES[label], device)
        layers = Engine(model, kernels="torch").layers
        for batch in (1, args.batches[-1]):
            if clock.left() < args.reserve:
                return
            images = torch.randn(batch, 3, *size, device=device, dtype=DTYPES[label])
            acts, grads = capture(model, layers, images)
            cam_maths(kernels, acts, grads, size)
            clock.sync()
            started = time.perf_counter()
            for _ in range(10):
                cam_maths(kernels, acts, grads, size)
            host = (time.perf_counter() - started) / 10
            clock.sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(5):
                    cam_maths(kernels, acts, grads, size)
                clock.sync()
            events = [(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0), e.key, e.count)
                      for e in prof.key_averages()]
            events = sorted((e for e in events if e[0] > 0), reverse=True)[:10]
            report.line(f"{label} batch {batch}: host time per call {host * 1e3:.2f} ms (launches only, no sync); "
                        "device time per call by kernel: "
                        + "; ".join(f"{key[:40]} {total / 5:.0f} us" for total, key, _ in events))
            report.records.append({"section": "profile", "dtype": label, "batch": batch, "host_s": host,
                                   "device_us": {key: total / 5 for total, key, _ in events}})
            if batch == args.batches[-1]:
                report.table(["weights c x hw", "map c x hw", "warps", "layer maps ms", "GB/s"])
                nbytes = sum(a.numel() * a.element_size() * 2 for a in acts)
                for wc, whw, mc, mhw, warps in SWEEP[: args.sweep]:
                    blocks = maps_op.Blocks(wc, whw, mc, mhw, 256, warps)
                    t = clock.compare({"maps": lambda: maps_op.layer_maps(acts, grads, blocks)}, rounds=3, inner=5)
                    report.row([f"{wc}x{whw}", f"{mc}x{mhw}", warps, f"{t['maps'] * 1e3:.2f}",
                                f"{nbytes / t['maps'] / 1e9:.0f}"],
                               section="sweep", dtype=label, batch=batch, blocks=[wc, whw, mc, mhw, warps],
                               seconds=t["maps"])
            del acts, grads, images
        del model
        report.save()


def time_end_to_end(report: Report, args, device: torch.device, clock: Clock, backends: list[tuple[str, str, str]],
                    title: str) -> None:
    """``backends``: (backend, kernels, dtype) rows."""
    report.line()
    report.line(title)
    report.line(f"resnet50, {args.size}x{args.size} uint8 frames on the GPU -> resize/normalise -> forward -> "
                "backward -> CAM maths -> normalised heatmaps. 'floor' is the bare forward + activation gradients "
                "on an already normalised batch.")
    report.table(["backend", "kernels", "dtype", "batch", "floor ms", "engine ms", "engine / floor", "frames/s",
                  "ms per frame"])
    for backend, kernels, label in backends:
        dtype = DTYPES[label]
        model = model_for("resnet50", dtype, device)
        try:
            engine = Engine(model, backend=backend, kernels=kernels)
        except Exception as exc:  # report and go on: the other rows still mean something
            report.line(f"({backend} {label}: {type(exc).__name__}: {exc})")
            continue
        bare = floor(model, engine.layers)
        for batch in args.batches:
            if clock.left() < args.reserve + (120 if backend == "compiled" else 0):
                report.line(f"(skipped {backend} {label} batch {batch}: out of budget)")
                continue
            frames = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
            normalised = engine.preprocess(frames, device, dtype)[0]
            try:
                started = time.perf_counter()
                engine.explain(frames)  # compiles on first use for the compiled backend
                first = time.perf_counter() - started
                t = clock.compare({"floor": lambda: bare(normalised), "engine": lambda: engine.explain(frames)},
                                  rounds=args.rounds)
            except Exception as exc:
                report.line(f"({backend} {label} batch {batch}: {type(exc).__name__}: {exc})")
                traceback.print_exc()
                continue
            report.row([backend, engine.kernels.name, label, batch, f"{t['floor'] * 1e3:.2f}", f"{t['engine'] * 1e3:.2f}",
                        f"{t['engine'] / t['floor']:.2f}", f"{batch / t['engine']:.0f}",
                        f"{t['engine'] * 1e3 / batch:.3f}"],
                       section="e2e", backend=backend, kernels=engine.kernels.name, dtype=label, batch=batch, seconds=t, first_call=first)
        if backend == "compiled":
            report.line(f"(compile seconds, per graph: {[round(s, 1) for s in engine._runner.compile_seconds.values()]})")
        del engine, model
        report.save()


def time_video(report: Report, args, device: torch.device, clock: Clock) -> None:
    report.line()
    report.line(f"## 4. Frames at {args.frame[1]}x{args.frame[0]} in, blended overlays out (resnet50, eager bf16)")
    report.line("Resize to 224 on the GPU, explain, resample the heatmap to the frame and blend it in (Turbo, "
                "alpha 0.5): into RGB frames (one fused launch), and into yuv420p planes as `wcam video` does "
                "(one launch per plane). No decode or encode.")
    report.table(["batch", "ms per batch", "frames/s", "RGB overlay ms", "YUV 4:2:0 overlay ms"])
    model = model_for("resnet50", torch.bfloat16, device)
    engine = Engine(model)
    lut = torch.from_numpy(TURBO_LUT.copy()).to(device)
    for batch in args.video_batches:
        if clock.left() < args.reserve:
            report.line(f"(skipped batch {batch}: out of budget)")
            continue
        frames = torch.randint(0, 256, (batch, 3, *args.frame), dtype=torch.uint8, device=device)
        rgb = frames.permute(0, 2, 3, 1).contiguous()
        height, width = args.frame
        yuv = YUVFrames(torch.randint(16, 236, (batch, height * width * 3 // 2), dtype=torch.uint8, device=device), height, width)
        star = engine.explain(frames).sums_at_layer_size

        def overlay() -> torch.Tensor:
            return engine.kernels.render(star, args.frame, "bilinear", frames=rgb, alpha=0.5, lut=lut)

        def overlay_yuv() -> YUVFrames:
            return engine.kernels.render(star, args.frame, "bilinear", frames=yuv, alpha=0.5, lut=lut)

        def whole() -> torch.Tensor:
            explained = engine.explain(frames)
            return engine.kernels.render(explained.sums_at_layer_size, args.frame, "bilinear", frames=rgb, alpha=0.5, lut=lut)

        t = clock.compare({"whole": whole, "overlay": overlay, "overlay_yuv": overlay_yuv}, rounds=args.rounds)
        report.row([batch, f"{t['whole'] * 1e3:.2f}", f"{batch / t['whole']:.0f}", f"{t['overlay'] * 1e3:.3f}",
                    f"{t['overlay_yuv'] * 1e3:.3f}"],
                   section="video", batch=batch, seconds=t, frame=list(args.frame))
    report.save()


def onnxruntime_cuda(report: Report, args, device: torch.device, clock: Clock) -> None:
    report.line()
    report.line("## 5. ONNX Runtime, CUDA execution provider")
    try:
        import onnxruntime as ort
    except ImportError:
        report.line("Not measured: onnxruntime is not installed here.")
        return
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        report.line(f"Not measured: onnxruntime {ort.__version__} here has no CUDA provider ({', '.join(providers)}); "
                    "it needs the onnxruntime-gpu wheel.")
        return
    time_end_to_end(report, args, device, clock, [("onnxruntime", "auto", "fp32")],
                    f"onnxruntime {ort.__version__} with the CUDA provider (I/O binding), fp32 graph:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/out")))
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs on the CPU, Triton interpreted")
    parser.add_argument("--only", nargs="+", help="run only these sections (check kernels profile e2e video "
                        "onnxruntime compiled)")
    args = parser.parse_args()
    args.reserve = 15.0
    if args.smoke:
        device = torch.device("cpu")
        args.models, args.size, args.batches, args.check_batch, args.rounds = ["resnet50"], 64, [1, 2], 1, 1
        args.compiled_dtypes, args.frame, args.video_batches = ["fp32"], (72, 128), [1]
        args.profile_dtypes, args.sweep = ["fp32"], 2
    else:
        device = torch.device("cuda")
        args.models, args.size, args.batches, args.check_batch, args.rounds = ["resnet50", "densenet121"], 224, [1, 8, 64], 8, 7
        args.compiled_dtypes, args.frame, args.video_batches = ["bf16"], (1080, 1920), [1, 8]
        args.profile_dtypes, args.sweep = list(DTYPES), len(SWEEP)
    clock = Clock(device, args.budget)
    report = Report(args.out)
    report.line("# wcam GPU benchmark")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (smoke run on the CPU)"
    import triton

    report.line(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {gpu}; torch {torch.__version__}; "
                f"triton {triton.__version__}; python {platform.python_version()}; `python bench/gpu.py`")
    report.line()
    sections: list[tuple[str, Callable[[], None]]] = [
        ("check", lambda: check_kernels(report, args, device)),
        ("kernels", lambda: time_kernels(report, args, device, clock, copy_bandwidth(clock, device, 8 if args.smoke else 1024))),
        ("profile", lambda: profile_kernels(report, args, device, clock)),
        ("e2e", lambda: time_end_to_end(
            report, args, device, clock, [("eager", "auto", "fp32"), ("eager", "auto", "bf16"), ("eager", "torch", "bf16")],
            "## 3. End to end: uint8 frames in, heatmaps out (eager torch backbone)")),
        ("video", lambda: time_video(report, args, device, clock)),
        ("onnxruntime", lambda: onnxruntime_cuda(report, args, device, clock)),
        ("compiled", lambda: time_end_to_end(
            report, args, device, clock, [("compiled", "auto", d) for d in args.compiled_dtypes],
            "## 6. End to end, compiled backbone (torch.compile, Inductor; compile time reported below)")),
    ]
    for name, section in sections:
        if args.only and name not in args.only:
            continue
        try:
            section()
        except Exception as exc:  # one broken section must not hide the others' numbers
            report.line(f"(section {name} failed: {type(exc).__name__}: {exc})")
            traceback.print_exc()
        report.save()
    report.line(f"(finished with {clock.left():.0f} s of budget left)")
    report.save()


if __name__ == "__main__":
    main()
