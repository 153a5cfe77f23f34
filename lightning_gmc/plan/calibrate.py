"""``--calibrate``: time the library's own pipelines on this device and write a :class:`DeviceProfile`.

What is timed (``torch.utils.benchmark``, median of blocked runs, one worker, a model of
:data:`REFERENCE_NUMELS` elements):

* each method's step with the identity compressor (encode, the exchange's local decode, decode; for
  methods with a detached point also the shifted copy of the parameters the hook makes);
* each compressor at each density: ``compress``, ``subtract_own`` and decoding its own payload
  (``propose`` and ``compress_on`` for ``topk_shared``), and decoding one more payload per coordinate;
* one pass over the elements and torch's bf16 compression hook; ``SGD(momentum, weight_decay)``'s
  step minus plain SGD's is the pass's cost times the bytes it moves more (a memory-bound step; the
  difference of two timings would amplify the noise of a busy machine);
* one 4-byte all-reduce between two gloo processes on loopback (the fixed cost of a collective);
* the fixed cost of a bucket: GMC's step with the identity, and each compressor at 1 %, on a bucket of
  :data:`TINY_NUMELS` elements (the Python work that does not grow with the bucket); the per-element
  costs are measured beyond it.

Every timed call starts from a fresh copy of its input, whose pass is subtracted. The bytes each
pipeline reads and writes are counted too (:mod:`~lightning_gmc.plan.bytecount`); :func:`derive_gpu_profile`
turns them into a profile for a GPU of a given memory bandwidth, labelled as not measured.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils import benchmark

from lightning_gmc.compressors import RandomStreams, Workspace, segments_from_numels
from lightning_gmc.config import GMCConfig
from lightning_gmc.methods import BucketStep, GroupHyper, ParameterTable, WorkerState
from lightning_gmc.plan.bytecount import count_bytes
from lightning_gmc.plan.profile import DeviceProfile
from lightning_gmc.plan.traffic import takes_density
from lightning_gmc.transport import CommStats, Exchange, InProcessCollectives

__all__ = [
    "CALIBRATED_COMPRESSORS",
    "CALIBRATED_METHODS",
    "DENSITIES",
    "REFERENCE_NUMELS",
    "calibrate",
    "derive_gpu_profile",
]

#: two 1M-element weight matrices, a quarter-size one and small biases: 2.36M elements
REFERENCE_NUMELS = (1 << 20, 1 << 20, 1 << 18, 1024, 1024, 256)
#: profile key -> method options (``gmc+`` is GMC with the paper's detach 0.5)
CALIBRATED_METHODS: dict[str, dict[str, Any]] = {
    "gmc": {"method": "gmc"},
    "gmc+": {"method": "gmc", "detach": 0.5},
    "ef": {"method": "ef"},
    "ef21": {"method": "ef21"},
    "dmsgd": {"method": "dmsgd"},
    "def_a": {"method": "def_a"},
    "ef_server_momentum": {"method": "ef_server_momentum"},
    "gmc_lr_inside": {"method": "gmc_lr_inside"},
}
CALIBRATED_COMPRESSORS = (
    "none",
    "topk",
    "topk_approx",
    "topk_shared",
    "randk",
    "rbgs",
    "scaled_sign",
    "qsgd",
)
DENSITIES = (0.001, 0.01, 0.1)
#: a bucket of two small tensors: what a pipeline costs whatever the size
TINY_NUMELS = (64, 64)
_HYPER = GroupHyper(lr=0.1, prev_lr=0.1, momentum=0.9, weight_decay=1e-4)

Runner = Callable[[], object]


def _median_seconds(run: Runner, min_run_time: float) -> float:
    run()  # first call allocates workspaces and plans
    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def _method_runner(options: dict[str, Any], numels: Sequence[int]) -> Runner:
    method = GMCConfig(compressor="none", **options).build()
    names = tuple(f"p{i}" for i in range(len(numels)))
    table = ParameterTable(names, tuple(torch.Size([n]) for n in numels), tuple(0 for _ in numels))
    worker = WorkerState(method, table, torch.device("cpu"), 0, 0)
    bucket = worker.bucket(tuple(range(len(numels))))
    exchange = Exchange(InProcessCollectives(1), CommStats())
    n = sum(numels)
    fresh, grad = torch.randn(n), torch.empty(n)
    params, spare = torch.randn(n), torch.empty(n)
    scale = method.detach_scale(_HYPER)
    clock = [0]

    def read_params(out: torch.Tensor) -> None:
        out.copy_(params)

    def run() -> None:
        grad.copy_(fresh)
        torch.aminmax(grad)  # the hook screens every bucket for non-finite values
        step = BucketStep(bucket, grad, grad, [_HYPER], clock[0], worker.rng, 1, read_params)
        messages = method.encode(step)
        means = exchange.start([messages], [bucket], clock[0]).wait()
        method.complete(step, messages, means[0])
        if scale:  # the hook's detached point: one shifted copy of the parameters
            torch.add(params, bucket.buffers["residual"], alpha=-scale, out=spare)
        clock[0] += 1

    return run


def _compressor_runners(name: str, density: float, numels: Sequence[int]) -> tuple[Runner, Runner, int]:
    compressor = GMCConfig(compressor=name, density=density).build().compressor  # as GMC runs it
    plan = compressor.plan(segments_from_numels(numels))
    n = plan.numel
    fresh, x, out, scratch = torch.randn(n), torch.empty(n), torch.empty(n), torch.empty(n)
    workspace, rng, clock = Workspace(), RandomStreams(0, 0), [0]
    last: list[Any] = []

    def run() -> None:
        x.copy_(fresh)
        if compressor.leader_support:
            payload = compressor.compress_on(x, plan, compressor.propose(x, plan), workspace)
        else:
            payload = compressor.compress(x, plan, rng, clock[0], workspace)
        compressor.subtract_own(x, payload, plan, scratch)
        compressor.decode_summed(payload, plan, out, 1)
        last[:] = [payload]
        clock[0] += 1

    def decode_one_more() -> None:
        compressor.decompress_add(last[0], plan, out)

    run()
    return run, decode_one_more, compressor.nnz(plan)


def _optimizer_runner(momentum: bool, n: int) -> Runner:
    param = torch.nn.Parameter(torch.randn(n))
    param.grad = torch.randn(n)
    optimizer = torch.optim.SGD(
        [param], lr=1e-3, momentum=0.9 if momentum else 0.0, weight_decay=1e-4 if momentum else 0.0
    )
    return optimizer.step


def _bf16_hook_runner(n: int) -> Runner:
    fresh, buffer = torch.randn(n), torch.empty(n)

    def run() -> None:  # torch's bf16_compress_hook around its all-reduce (here of one worker)
        buffer.copy_(fresh)
        compressed = buffer.to(torch.bfloat16).div_(1)
        buffer.copy_(compressed)

    return run


def _gloo_latency_worker(rank: int, port: int, reps: int, queue: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensor = torch.zeros(1)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(statistics.median(times[reps // 5 :]))
    dist.barrier()
    dist.destroy_process_group()


def gloo_latency(reps: int = 200) -> float:
    """Median seconds of a 4-byte all-reduce between two gloo processes on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_gloo_latency_worker, args=(r, port, reps, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        latency = float(queue.get(timeout=120))
    finally:
        for proc in procs:
            proc.join(timeout=30)
    return latency


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate(
    numels: Sequence[int] = REFERENCE_NUMELS,
    min_run_time: float = 0.3,
    compressors: Sequence[str] = CALIBRATED_COMPRESSORS,
    densities: Sequence[float] = DENSITIES,
    methods: dict[str, dict[str, Any]] | None = None,
    latency: bool = True,
    rounds: int = 3,
) -> DeviceProfile:
    """Measure a :class:`DeviceProfile` of this machine's CPU (module docstring).

    Every pipeline is timed in ``rounds`` interleaved rounds of ``min_run_time / rounds`` seconds each
    and the median over the rounds is kept, so that a change of the machine's load during the
    calibration touches every pipeline alike.
    """
    methods = CALIBRATED_METHODS if methods is None else methods
    n = sum(numels)
    fresh, x = torch.randn(n), torch.empty(n)
    # name -> (what runs, per how many items, whether it starts with a copy of its input)
    timed: dict[str, tuple[Runner, int, bool]] = {
        "copy": (lambda: x.copy_(fresh), n, False),
        "pass": (lambda: x.mul_(0.999), n, False),
        "bf16_hook": (_bf16_hook_runner(n), n, True),
    }
    for key, options in methods.items():
        timed[f"method:{key}"] = (_method_runner(options, numels), n, True)
    tables: dict[str, list[str]] = {}
    for name in compressors:
        has_density = takes_density(GMCConfig(compressor=name).build().compressor)
        tables[name] = []
        for density in densities if has_density else (1.0,):
            run, decode_more, nnz = _compressor_runners(name, density, numels)
            timed[f"compressor:{name}:{density:g}"] = (run, n, True)
            tables[name].append(f"{density:g}")
            if density == (0.01 if has_density else 1.0):
                timed[f"decode:{name}"] = (decode_more, nnz, False)
                tiny = _compressor_runners(name, density, TINY_NUMELS)[0]
                timed[f"fixed:compressor:{name}"] = (tiny, 1, False)
    timed["fixed:method"] = (_method_runner(CALIBRATED_METHODS["gmc"], TINY_NUMELS), 1, False)
    samples: dict[str, list[float]] = {key: [] for key in timed}
    for _ in range(rounds):
        for key, (run, _, _) in timed.items():
            samples[key].append(_median_seconds(run, min_run_time / rounds))
    seconds = {key: statistics.median(values) for key, values in samples.items()}
    fixed = {key[len("fixed:") :]: seconds.pop(key) for key in list(seconds) if key.startswith("fixed:")}
    bytes_per: dict[str, float] = {}
    ns: dict[str, float] = {}
    for key, (run, items, copies) in timed.items():
        if key.startswith("fixed:"):
            continue
        minus = (seconds["copy"] if copies else 0.0) + _fixed_part(key, fixed)
        ns[key] = max(seconds[key] - minus, 0.0) * 1e9 / items
        bytes_per[key] = (count_bytes(run) - (8.0 * n if copies else 0.0)) / items
    bytes_per.pop("copy")
    identity = fixed["compressor:none"]
    momentum_bytes = count_bytes(_optimizer_runner(True, n)) - count_bytes(_optimizer_runner(False, n))
    bytes_per["optimizer_momentum"] = momentum_bytes / n
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    source = (
        f"measured by `python -m lightning_gmc.plan --calibrate` on {_cpu_model()}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"load average {load}; {n} elements in {len(numels)} tensors, median of {rounds} rounds"
    )
    return DeviceProfile(
        name="cpu",
        device="cpu",
        measured=True,
        source=source,
        pass_ns=ns["pass"],
        # a difference of two timings amplifies the noise of a busy machine; the momentum step is
        # memory-bound, so its cost is the measured pass over the bytes it moves (counted)
        optimizer_momentum_ns=ns["pass"] * bytes_per["optimizer_momentum"] / 8.0,
        bf16_hook_ns=ns["bf16_hook"],
        methods_ns={key: ns[f"method:{key}"] for key in methods},
        compressors_ns={name: {d: ns[f"compressor:{name}:{d}"] for d in ds} for name, ds in tables.items()},
        decode_ns_per_nnz={name: ns[f"decode:{name}"] for name in compressors},
        collective_latency_s=gloo_latency() if latency else 0.0,
        bytes_per_element=bytes_per,
        bucket_overhead_s=fixed["method"],
        compressor_overhead_s={
            name: max(fixed[f"compressor:{name}"] - identity, 0.0) for name in compressors
        },
    )


def _fixed_part(key: str, fixed: dict[str, float]) -> float:
    """The size-independent seconds inside the timing ``key`` (measured on a tiny bucket)."""
    if key.startswith("method:"):
        return fixed["method"]
    if key.startswith("compressor:"):
        return fixed["compressor:" + key.split(":")[1]]
    return 0.0


def derive_gpu_profile(
    measured: DeviceProfile,
    name: str,
    memory_bytes_per_s: float,
    efficiency: float = 0.85,
    collective_latency_s: float = 3e-5,
    spec: str = "",
) -> DeviceProfile:
    """A GPU profile from the bytes each pipeline moves per element (counted in ``measured``) over the
    GPU's memory bandwidth: ``ns = bytes / (efficiency * bandwidth)``. Not a measurement: kernel
    launch overheads and compute-bound kernels are not in it, and the ``source`` says so."""
    rate = efficiency * memory_bytes_per_s / 1e9  # bytes per ns
    counted = measured.bytes_per_element

    def ns(key: str) -> float:
        return counted[key] / rate

    compressors = {
        comp: {d: ns(f"compressor:{comp}:{d}") for d in table}
        for comp, table in measured.compressors_ns.items()
    }
    source = (
        f"NOT MEASURED: derived from memory bandwidth ({memory_bytes_per_s / 1e12:g} TB/s{spec}, "
        f"{efficiency:g} of it reached) and the bytes each pipeline moves per element, counted on "
        f"the CPU calibration ({measured.source}); collective latency {collective_latency_s * 1e6:g} us "
        f"assumed; the fixed costs per bucket (host-side Python) are the CPU's. Run "
        f"`python -m lightning_gmc.plan --calibrate` on the GPU to measure it."
    )
    return replace(
        measured,
        name=name,
        device="cuda",
        measured=False,
        source=source,
        pass_ns=ns("pass"),
        optimizer_momentum_ns=ns("optimizer_momentum"),
        bf16_hook_ns=ns("bf16_hook"),
        methods_ns={key: ns(f"method:{key}") for key in measured.methods_ns},
        compressors_ns=compressors,
        decode_ns_per_nnz={comp: ns(f"decode:{comp}") for comp in measured.decode_ns_per_nnz},
        collective_latency_s=collective_latency_s,
    )
