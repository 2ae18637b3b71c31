"""One-shot GPU check (`make gpu-check OUT=DIR`): for a machine that has Python, torch, triton and
nvcc installed and no network. It installs nothing. Steps, each printed as it goes:

1. no CUDA GPU -> a clear message and exit code 2 (nothing else runs);
2. build the extension in place for this GPU only (TORCH_CUDA_ARCH_LIST from
   torch.cuda.get_device_capability(), G3DR_CUDA=1, `setup.py build_ext --inplace`; no pip, no venv);
3. run the GPU tests: every test of the triton and cuda backends (values and gradients against the
   reference, fp32/bf16/fp16 where the suites have them), TRITON_INTERPRET unset;
4. benchmarks at the G3DR training size (B=8, C=64, 128x128 planes, 3 levels, 16,384 rays, 32+32
   samples, hidden 64): sample, composite and render, fwd+bwd, time (CUDA events, median) and
   torch.cuda.max_memory_allocated, fused backends vs the official path (benchmarks/official.py),
   and the whole TriplaneRenderer as G3DR trains with it (EG3D sampling, coarse pass, target
   replacement); then the render and renderer at B=64 where they fit;
5. results with the device name in DIR: gpu_check.json, gpu_check.md, build.log, tests.log, tests.xml.

Exit codes: 0 all passed, 1 test failures (or a stage timed out), 2 no GPU / bad arguments, 3 build failed.
The whole run keeps within --budget-s (default 450 s): later stages get what is left.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
NO_GPU_EXIT, BUILD_EXIT, FAIL_EXIT = 2, 3, 1
TEST_SELECTION = "triton or cuda"  # test ids/modules of the GPU backends (param ids "triton", "cuda")


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build, test and benchmark g3dr_kernels on this machine's GPU (offline).")
    p.add_argument("--out", required=True, help="directory for the results (created)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for the whole run (s)")
    p.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per benchmark case")
    a = p.parse_args(argv)
    if a.budget_s <= 0 or a.reps < 1:
        p.error("--budget-s must be > 0 and --reps >= 1")
    return a


def arch_list(capability) -> str:
    """(major, minor) -> TORCH_CUDA_ARCH_LIST for this GPU only, e.g. (9, 0) -> '9.0'."""
    major, minor = capability
    return f"{int(major)}.{int(minor)}"


def build_command(capability) -> Tuple[List[str], Dict[str, str]]:
    """The in-place build: no pip, no network; CUDA required and compiled for this GPU's arch only."""
    env = dict(os.environ, G3DR_CUDA="1", TORCH_CUDA_ARCH_LIST=arch_list(capability),
               MAX_JOBS=str(os.cpu_count() or 4))
    return [sys.executable, "setup.py", "build_ext", "--inplace"], env


def gpu_tests_command(out: Path) -> Tuple[List[str], Dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    # -v: one line per test with its outcome, so a run the watchdog cuts short still names what failed
    # (the summary and the junit file are written only at the end); -x is not used: every failure counts
    cmd = [sys.executable, "-m", "pytest", "tests", "-v", "-rfE", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "-k", TEST_SELECTION,
           f"--junitxml={out / 'tests.xml'}"]
    return cmd, env


def run_logged(cmd, env, logfile: Path, timeout: float) -> Dict:
    """Run cmd with its output to logfile (and echoed as it comes); a watchdog kills it after
    `timeout` seconds even if it prints nothing."""
    t0 = time.time()
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:  # ends when the process exits or is killed
                f.write(line)
                print("    " + line, end="", flush=True)
            rc = proc.wait()
        finally:
            watchdog.cancel()
        timed_out = time.time() - t0 >= timeout and rc != 0
        if timed_out:
            f.write(f"\n[gpu-check] killed after {timeout:.0f} s\n")
    return dict(rc=rc, timed_out=timed_out, seconds=round(time.time() - t0, 1))


# ------------------------------------------------------------------------------------------ benchmarks
G3DR_SIZE = dict(C=64, H=128, R=16384, S=64, hidden=64, D=3)


def _time(fn, reps: int, dev: str) -> Dict:
    """Median/min seconds of fn() over reps after one warm-up (CUDA events on a GPU), and the peak
    of torch.cuda.max_memory_allocated above the memory allocated before (None on the CPU)."""
    import torch
    cuda = dev == "cuda"
    fn()  # warm-up (compiles Triton kernels, fills caches)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return dict(median_s=times[len(times) // 2], min_s=times[0], peak_mem_bytes=peak)


def _cases(B: int, dev: str = "cuda", size: Dict = G3DR_SIZE):
    """(op, impl, fn) for fwd+bwd of sample / composite / render with batch B (default: the G3DR
    training size); impls: the official path ("baseline") and the fused backends usable on dev."""
    import torch
    import g3dr_kernels as K
    from g3dr_kernels import _backend, sampling
    from g3dr_kernels.nn import TriplaneDecoder, TriplaneRenderer
    from benchmarks import official
    g = torch.Generator(device=dev).manual_seed(0)
    C, H, R, S, Hd, D = (size[k] for k in ("C", "H", "R", "S", "hidden", "D"))
    planes = (0.5 * torch.randn(B, 3, C, H, H, device=dev, generator=g)).requires_grad_()
    cam = torch.nn.functional.normalize(torch.randn(B, 1, 3, device=dev, generator=g), dim=-1) * 2.7
    rays_o = cam.expand(B, R, 3).contiguous()
    rays_d = torch.nn.functional.normalize(0.6 * (torch.rand(B, R, 3, device=dev, generator=g) - 0.5) - rays_o, dim=-1)
    near, far, _ = sampling.ray_box_bounds(rays_o, rays_d, 2.0)
    depths = sampling.stratified_depths(near, far, S, perturb=True, generator=g)
    target = near + (far - near) * (0.4 + 0.2 * torch.rand(B, R, device=dev, generator=g))
    w1 = (torch.randn(Hd, C, device=dev, generator=g) / C ** 0.5).requires_grad_()
    b1 = torch.zeros(Hd, device=dev, requires_grad=True)
    w2 = (torch.randn(1 + D, Hd, device=dev, generator=g) / Hd ** 0.5).requires_grad_()
    b2 = torch.zeros(1 + D, device=dev, requires_grad=True)
    dec = TriplaneDecoder(C, Hd, D).to(dev)
    xyz = (rays_o.unsqueeze(2) + depths.unsqueeze(-1) * rays_d.unsqueeze(2)).reshape(B, R * S, 3)
    sigma = torch.randn(B, R, S, device=dev, generator=g, requires_grad=True)
    rgb = torch.rand(B, R, S, D, device=dev, generator=g, requires_grad=True)

    def bwd(outs):
        outs = [o for o in outs if o is not None and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    fused = ("triton", "cuda") if dev == "cuda" else ("cpu",)
    # the official path last: at B=64 it runs out of memory, and the fused cases should not run after that
    impls = [b for b in fused if _backend._unavailable("render", b, torch.device(dev)) is None] + ["baseline"]
    for impl in impls:
        if impl == "baseline":
            yield "sample", impl, lambda: bwd([official.sample_triplanes(planes, xyz, 3)])
            yield "composite", impl, lambda: bwd(official.mip_ray_marcher(rgb, sigma.unsqueeze(-1), depths.unsqueeze(-1),
                                                                          target)[:3])
            yield "render", impl, lambda: bwd(official.render(planes, rays_o, rays_d, depths, w1, b1, w2, b2,
                                                              target_depth=target)[:3])
        else:
            yield "sample", impl, lambda b=impl: bwd([K.sample_triplanes(planes, xyz, backend=b)])
            yield "composite", impl, lambda b=impl: bwd(K.composite(sigma, rgb, depths, target_depth=target,
                                                                    return_weights=False, backend=b))
            yield "render", impl, lambda b=impl: bwd(K.render_triplanes(planes, rays_o, rays_d, depths, w1, b1, w2, b2,
                                                                        target_depth=target, return_weights=False,
                                                                        backend=b))
            # the whole nn renderer as G3DR trains with it: EG3D sampling with its coarse pass, target replacement
            r = TriplaneRenderer(dec, n_coarse=S // 2, n_fine=S - S // 2, sampling="eg3d", target_mode="replace",
                                 target_prob=0.4, backend=impl)
            yield "renderer", impl, lambda r=r: bwd(r(planes, rays_o, rays_d, target_depth=target)[:3])


def run_benchmarks(deadline: float, reps: int, dev: str = "cuda", size: Dict = G3DR_SIZE,
                   batches=(8, 64)) -> List[Dict]:
    """Every case of `_cases` for the first batch size, the render only for the others; failures and
    out-of-memory are recorded as rows; cases past the deadline are recorded as skipped."""
    import torch
    rows = []
    for B in batches:
        for op, impl, fn in _cases(B, dev, size):
            if B != batches[0] and op not in ("render", "renderer"):
                continue
            label = (f"{op} B={B} C={size['C']} {size['H']}x{size['H']} L3 R={size['R']} "
                     f"S={size['S'] // 2}+{size['S'] // 2} fwd+bwd")
            if time.time() > deadline:
                rows.append(dict(op=op, impl=impl, config=label, status="skipped: time budget"))
                log(f"bench {label} [{impl}]: skipped (time budget)")
                continue
            try:
                r = _time(fn, reps, dev)
                rows.append(dict(op=op, impl=impl, config=label, status="ok", **r))
                log(f"bench {label} [{impl}]: {r['median_s'] * 1e3:.1f} ms, peak {_mib(r['peak_mem_bytes'])}")
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(op=op, impl=impl, config=label, status="out of memory"))
                log(f"bench {label} [{impl}]: out of memory")
            except Exception as e:  # a failing backend is a result to record, not a reason to stop
                rows.append(dict(op=op, impl=impl, config=label, status=f"error: {type(e).__name__}: {e}"[:500]))
                log(f"bench {label} [{impl}]: ERROR {type(e).__name__}: {e}")
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def write_summary(out: Path, result: Dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# gpu-check on {result.get('device') or 'no GPU'}", "",
             f"date {result['date']}, commit {result['commit']}, torch {result['torch']}, "
             f"triton {result.get('triton')}, status **{result['status']}**", ""]
    for stage in ("build", "tests"):
        if stage in result:
            lines.append(f"- {stage}: {json.dumps(result[stage])}")
    if result.get("bench"):
        base = {(r["op"], r["config"]): r for r in result["bench"] if r["impl"] == "baseline" and r["status"] == "ok"}
        lines += ["", "| case | impl | median | peak memory | speed-up vs official |", "|---|---|---|---|---|"]
        for r in result["bench"]:
            if r["status"] != "ok":
                lines.append(f"| {r['config']} | {r['impl']} | {r['status']} | | |")
                continue
            b = base.get((r["op"], r["config"]))
            sp = f"{b['median_s'] / r['median_s']:.1f}x" if b and r["impl"] != "baseline" else ""
            lines.append(f"| {r['config']} | {r['impl']} | {r['median_s'] * 1e3:.1f} ms | "
                         f"{_mib(r['peak_mem_bytes'])} | {sp} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def backends_report() -> Dict:
    """g3dr_kernels.backends() as seen by a fresh interpreter (so it loads the extension just built)."""
    code = "import json, g3dr_kernels as k; print(json.dumps(k.backends()))"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # report, do not stop: the tests say more
        return {"error": f"{type(e).__name__}: {e}"}


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=sha,
                  torch=torch.__version__, triton=_version("triton"), python=platform.python_version(),
                  cuda=torch.version.cuda, nvcc=shutil.which("nvcc"), status="running")
    if not torch.cuda.is_available():
        result.update(status="no-gpu", device=None)
        write_summary(out, result)
        log("no CUDA GPU is visible to torch (torch.cuda.is_available() is False); nothing to check. "
            f"Results: {out / 'gpu_check.json'}")
        return NO_GPU_EXIT
    os.environ.pop("TRITON_INTERPRET", None)  # the benchmarks run in this process: compiled Triton only
    cap = torch.cuda.get_device_capability(0)
    result.update(device=torch.cuda.get_device_name(0), capability=arch_list(cap))
    log(f"device {result['device']} (sm {result['capability']}), torch {torch.__version__}, budget {args.budget_s:.0f} s")
    status = "passed"
    if not args.skip_build:
        cmd, env = build_command(cap)
        log(f"building in place for TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} (no pip, no network)")
        result["build"] = run_logged(cmd, env, out / "build.log", max(30.0, 0.45 * (deadline - time.time())))
        if result["build"]["rc"] != 0:
            result["status"] = "build failed"
            write_summary(out, result)
            log(f"build FAILED: see {out / 'build.log'}")
            return BUILD_EXIT
        log(f"build done in {result['build']['seconds']} s")
    result["backends"] = backends_report()
    log(f"backends: {result['backends']}")
    missing = [b for b in ("triton", "cuda") if not result["backends"].get(b, {}).get("available")]
    if missing:  # their tests would skip, which must not pass for a check
        status = f"backend(s) {missing} unavailable"
        log(f"WARNING: {status}; their tests will skip")
    if not args.skip_tests:
        cmd, env = gpu_tests_command(out)
        budget = max(30.0, (deadline - time.time()) * (1.0 if args.skip_bench else 0.75))
        log(f"running GPU tests: pytest -k '{TEST_SELECTION}' (TRITON_INTERPRET unset, limit {budget:.0f} s)")
        result["tests"] = run_logged(cmd, env, out / "tests.log", budget)
        if result["tests"]["rc"] != 0:
            status = "tests timed out" if result["tests"]["timed_out"] else "tests failed"
        log(f"tests: {status} in {result['tests']['seconds']} s")
    if not args.skip_bench:
        sys.path.insert(0, str(ROOT))
        log("benchmarks at the G3DR training size (fwd+bwd, CUDA events)")
        result["bench"] = run_benchmarks(deadline, args.reps)
    result["status"] = status
    result["seconds"] = round(time.time() - t0, 1)
    write_summary(out, result)
    log(f"{status} in {result['seconds']} s; results in {out}")
    return 0 if status == "passed" else FAIL_EXIT


if __name__ == "__main__":
    sys.exit(main())
