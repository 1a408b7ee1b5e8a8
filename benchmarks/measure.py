"""Measuring tools: FLOP counting, bytes saved for backward, timing statistics, peak memory, NVML
energy. No model code here."""

import contextlib
import ctypes
import gc
import resource
import statistics
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class CountFlops(TorchDispatchMode):
    """FLOPs of every op that runs inside (forward and backward), with the formulas of
    torch.utils.flop_counter (FlopCounterMode's registry: mm, addmm, bmm, baddbmm, convolution and
    their backwards, the fused attention ops).

    FlopCounterMode itself also tracks modules, and its tracker's gradient hooks make
    `torch.autograd.grad` fail when a module's input is a leaf tensor (as the sampler's latents are):
    this mode counts the same ops without module tracking. Only the registered (matmul-like) ops
    count; elementwise work does not. On the CPU the fused SDPA kernel is not registered: count
    under `math_attention()` (or on the meta device, where SDPA runs the math path).
    """

    def __init__(self):
        super().__init__()
        self.by_op = defaultdict(int)

    @property
    def total(self):
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.by_op[str(packet)] += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def math_attention(device):
    """SDPA through its math decomposition where the fused kernel's FLOPs are not counted (CPU)."""
    if torch.device(device).type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def eager():
    """Run torch.compile'd code eagerly (for counting FLOPs and saved tensors of a compiled row)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _storage_key(tensor):
    return tensor.untyped_storage()._cdata


class SavedForBackward:
    """Bytes of the tensors autograd saves for the backward while active: each storage counted once
    (a view keeps its whole storage alive), parameters and buffers of `modules` left out (they are
    resident anyway). Works on the meta device."""

    def __init__(self, *modules):
        self.resident = set()
        for module in modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                self.resident.add(_storage_key(tensor))
        self.storages = {}
        self._hooks = None

    @property
    def nbytes(self):
        return sum(self.storages.values())

    def _pack(self, tensor):
        key = _storage_key(tensor)
        if key not in self.resident and key not in self.storages:
            self.storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def summary(samples):
    """Median and spread of timing samples (seconds): median, IQR bounds, min, max, n."""
    samples = sorted(samples)
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1, q3 = samples[0], samples[-1]
    return {
        "median": statistics.median(samples),
        "q1": q1,
        "q3": q3,
        "min": samples[0],
        "max": samples[-1],
        "n": len(samples),
    }


def _status_bytes(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes():
    """Peak resident set size of this process since start or since the last `reset_peak_rss()`
    (Linux VmHWM; elsewhere the lifetime peak from getrusage)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss(collect=True):
    """Return freed heap to the OS, reset the peak RSS to the current RSS (Linux: clear_refs 5) and
    return the current RSS in bytes, the baseline a phase's peak is measured against. `collect=False`
    skips the garbage collection and heap trim (a few tenths of a second in a process holding torch
    and diffusers), for a reading whose value does not matter (a dry run)."""
    if collect:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    current = _status_bytes("VmRSS")
    return current if current is not None else peak_rss_bytes()


class Energy:
    """GPU energy from NVML (joules between start and stop); unavailable without a GPU or NVML."""

    def __init__(self, device):
        self.handle, self.reason = None, "no GPU"
        if torch.device(device).type != "cuda":
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "NVML unavailable (no pynvml)"
            return
        try:
            pynvml.nvmlInit()
            index = torch.device(device).index or 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # not every GPU reports energy
            self._nvml = pynvml
        except pynvml.NVMLError as error:
            self.handle, self.reason = None, f"NVML unavailable ({type(error).__name__})"

    @property
    def available(self):
        return self.handle is not None

    def read_joules(self):
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0
