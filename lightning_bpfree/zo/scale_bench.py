"""``bpfree zo-scale``: the largest LLaMA-family model each method can train in a memory budget.

Five methods take one real training step in a Lightning ``Trainer``: ZO-SGD (the
``ZerothOrder`` callback, MeZO) with bfloat16 weights (``precision="bf16-true"``) and with float32
weights, first-order SGD in float32, and AdamW in ``bf16-mixed`` (float32 master weights, gradients
and moments; bf16 autocast) and in ``bf16-true`` (everything bf16). For each method the command
finds the largest model on a ladder of LLaMA shapes (vocabulary 32000, untied embeddings, sizes
about 9 % apart) whose step completes within ``--budget-gib`` of peak resident memory (default: this
machine's ``MemTotal`` minus headroom) and within ``--trial-timeout`` seconds.

How: the models are built on the meta device and materialised with a cheap deterministic fill (no
download, no random init of billions of values: a seeded block of noise tiled over each weight).
Every trial runs in its own process, its peak memory is the process's ``VmHWM``, and a watchdog in
this process kills a trial the moment its peak passes the budget (so the machine never swaps or
meets the OOM killer; ``RLIMIT_AS`` is a backstop). Two small trials per method give bytes per
parameter; the first guess from them is verified with real trials and the boundary is found by
galloping then bisection over the ladder. Writes ``zo-scale.{json,md,png}``.

Trials are forked from a server process that has imported torch, transformers and Lightning once:
a fresh interpreter spends 5-20 s on those imports, more than most trials take. ``VmHWM`` of a
forked process starts at its resident size at the fork, so the imports' memory still counts; a fresh
interpreter running the same trial peaks 60-80 MiB higher (temporaries of the imports, freed before
the trial starts; measured on 85 M-parameter ZO trials).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name
from lightning_bpfree.zo.perturbation import mix_seed

NAME = command_name(__name__)

GIB = 1 << 30
VOCAB_SIZE = 32000  # LLaMA / LLaMA-2 tokenizer
HEAD_DIM = 64
HIDDEN_PER_LAYER = 64  # the ladder's aspect ratio hidden / layers (LLaMA-7B: 128, TinyLlama: 93, SmolLM2-135M: 19)
LADDER_STEP = 2 ** (1 / 8)  # about 9 % more parameters per rung
INIT_STD = 0.02  # LlamaConfig.initializer_range
FILL_PERIOD = 1_048_573  # prime: the tiled noise does not line up with any row length, so rows differ

METHODS: dict[str, dict[str, Any]] = {
    "zo-sgd bf16-true": {"optimizer": "zo-sgd", "precision": "bf16-true", "dtype": "bfloat16"},
    "zo-sgd fp32": {"optimizer": "zo-sgd", "precision": "32-true", "dtype": "float32"},
    "fo-sgd fp32": {"optimizer": "sgd", "precision": "32-true", "dtype": "float32"},
    "fo-adamw bf16-mixed": {"optimizer": "adamw", "precision": "bf16-mixed", "dtype": "float32"},
    "fo-adamw bf16-true": {"optimizer": "adamw", "precision": "bf16-true", "dtype": "bfloat16"},
}
"""Method label -> optimizer, Lightning precision and the dtype the weights are built in (built directly
in bf16 for ``bf16-true``, so that no float32 copy ever exists)."""

ZO_BF16, ADAMW_MIXED, ADAMW_BF16 = "zo-sgd bf16-true", "fo-adamw bf16-mixed", "fo-adamw bf16-true"
QUICK_BUDGET_GIB = 1.25
GOAL_RATIO = 10.0  # issue 17: the largest ZO model >= 10x the largest bf16-mixed AdamW model (MeZO: 30B vs 2.7B)


# ----------------------------------------------------------------------------------------------
# The ladder of shapes


@dataclass(frozen=True)
class Shape:
    """A LLaMA shape: ``hidden`` model width, ``layers`` decoder layers, ``intermediate`` MLP width,
    ``heads`` attention heads (of :data:`HEAD_DIM`, as many key/value heads), ``vocab`` tokens."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int = VOCAB_SIZE

    @property
    def params(self) -> int:
        """Parameter count of ``LlamaForCausalLM`` with untied embeddings (checked against the model in the tests)."""
        h, f = self.hidden, self.intermediate
        per_layer = 4 * h * h + 3 * h * f + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
        return 2 * self.vocab * h + h + self.layers * per_layer


def shape_for(target_params: float, vocab: int = VOCAB_SIZE) -> Shape:
    """The shape closest to ``target_params`` with ``hidden / layers`` about :data:`HIDDEN_PER_LAYER`.

    ``hidden`` is a multiple of 128 (heads of 64), the MLP is LLaMA's ``8/3 hidden`` rounded up to 256,
    and the layer count absorbs the rest, so that neighbouring targets get distinct sizes.
    """
    # 12 h^2 parameters per layer and h / HIDDEN_PER_LAYER layers: P ~ 12 h^3 / HIDDEN_PER_LAYER
    hidden = max(128, 128 * round((target_params * HIDDEN_PER_LAYER / 12) ** (1 / 3) / 128))
    intermediate = 256 * math.ceil(8 * hidden / 3 / 256)
    per_layer = Shape(hidden, 1, intermediate, hidden // HEAD_DIM, vocab).params - Shape(hidden, 0, intermediate, 1, vocab).params
    layers = max(1, round((target_params - 2 * vocab * hidden - hidden) / per_layer))
    return Shape(hidden, layers, intermediate, hidden // HEAD_DIM, vocab)


def size_ladder(max_params: float, min_params: float = 8e6, vocab: int = VOCAB_SIZE) -> list[Shape]:
    """Shapes of increasing size from about ``min_params`` to the first one above ``max_params``,
    each at least 3 % larger than the one before (targets :data:`LADDER_STEP` apart)."""
    shapes: list[Shape] = []
    target = min_params
    while not shapes or shapes[-1].params <= max_params:
        shape = shape_for(target, vocab)
        if not shapes or shape.params > 1.03 * shapes[-1].params:
            shapes.append(shape)
        target *= LADDER_STEP
    return shapes


# ----------------------------------------------------------------------------------------------
# The search


def largest_passing(
    count: int, passes: Callable[[int], bool], start: int | None = None, known: Mapping[int, bool] | None = None
) -> tuple[int | None, list[int]]:
    """The largest index ``i`` in ``[0, count)`` with ``passes(i)``, for a monotone ``passes`` (true up to
    some index, false after it).

    Starts at ``start`` (a first estimate; default the middle), gallops away from it with steps 1, 2,
    4, ... until the boundary is bracketed, then bisects. ``known`` holds results already measured
    (e.g. the small trials of the estimate), which are never asked again and narrow the bracket.
    With a good estimate this takes two calls (``start`` passes, ``start + 1`` fails).

    Returns ``(index or None when nothing passes, the indices asked, in order)``.
    """
    results = dict(known or {})
    asked: list[int] = []

    def ask(index: int) -> bool:
        if index not in results:
            asked.append(index)
            results[index] = bool(passes(index))
        return results[index]

    def bounds() -> tuple[int, int]:  # (largest known pass or -1, smallest known fail or count)
        low = max((i for i, ok in results.items() if ok), default=-1)
        high = min((i for i, ok in results.items() if not ok), default=count)
        return low, high

    if count <= 0:
        return None, asked
    low, high = bounds()
    if high - low > 1:
        index = min(max(count // 2 if start is None else start, low + 1), high - 1)
        step = 1
        if ask(index):  # gallop up until something fails
            while index < count - 1 and bounds()[1] > index + 1:
                index = min(index + step, bounds()[1] - 1, count - 1)
                step *= 2
                if not ask(index):
                    break
        else:  # gallop down until something passes
            while index > 0 and bounds()[0] < index - 1:
                index = max(index - step, bounds()[0] + 1, 0)
                step *= 2
                if ask(index):
                    break
    low, high = bounds()
    while high - low > 1:
        middle = (low + high) // 2
        ask(middle)
        low, high = bounds()
    return (low if low >= 0 else None), asked


def linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = intercept + slope * x`` through ``(x, y)`` points
    (one point: the line through the origin)."""
    if len(points) == 1:
        x, y = points[0]
        return 0.0, y / x
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return mean_y - slope * mean_x, slope


# ----------------------------------------------------------------------------------------------
# The model: meta device, then a cheap deterministic fill


def build_llama(shape: Shape, dtype: torch.dtype = torch.float32, seed: int = 0, seq_len: int = 256) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with weights in ``dtype``, materialised without a random init.

    Built on the meta device (no memory), allocated with ``to_empty`` directly in ``dtype`` (a bf16
    model never has a float32 copy), then filled by :func:`fill_deterministic_`. The rotary
    embedding's frequencies (the only buffers) are recomputed. Seconds for billions of parameters,
    where ``LlamaForCausalLM(config)``'s own init draws every value one by one.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=max(seq_len, 2), tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        pad_token_id=2,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # real inv_freq (to_empty left garbage)
    fill_deterministic_(model, seed)
    return model.train()


@torch.no_grad()
def fill_deterministic_(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> torch.nn.Module:
    """Fill every parameter in place: normalization weights with 1, the others with a seeded block of
    ``N(0, std^2)`` noise (:data:`FILL_PERIOD` values, drawn once) tiled over the flattened tensor from
    an offset that depends on ``(seed, parameter index)``.

    A copy at memory speed instead of drawing every value; the same ``seed`` gives the same weights
    whatever the dtype, thread count or machine. Memory and time of a step do not depend on the values,
    and these keep the loss finite.
    """
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5CA1E))
    block = torch.randn(FILL_PERIOD, generator=generator).mul_(std)
    twice = torch.cat([block, block])  # any window of FILL_PERIOD values is a slice of it
    norms = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    for index, param in enumerate(model.parameters()):
        if id(param) in norms:
            param.fill_(1.0)
            continue
        offset = mix_seed(seed, index) % FILL_PERIOD
        source = twice[offset : offset + FILL_PERIOD]
        flat = param.view(-1)
        whole = flat.numel() // FILL_PERIOD * FILL_PERIOD
        if whole:
            flat[:whole].view(-1, FILL_PERIOD).copy_(source.expand(whole // FILL_PERIOD, FILL_PERIOD))
        flat[whole:].copy_(source[: flat.numel() - whole])
    return model


# ----------------------------------------------------------------------------------------------
# One trial (runs in its own process)


def _kib(path: str, field: str) -> int | None:
    """A ``kB`` field of a ``/proc`` file in KiB (``VmHWM``/``VmRSS`` of ``/proc/<pid>/status``,
    ``MemTotal`` of ``/proc/meminfo``); None when the file (the process) is gone."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_trial(
    method: str, shape: dict[str, int], batch_size: int = 1, seq_len: int = 32, seed: int = 0, threads: int = 1
) -> dict[str, Any]:
    """Build the model of ``shape`` (the fields of :class:`Shape`) and take one training step of ``method``
    (a key of :data:`METHODS`) in a Lightning ``Trainer``, on ``batch_size x seq_len`` random tokens.

    Returns ``params``, ``build_seconds`` (meta -> filled weights), ``step_seconds`` (the training batch,
    optimizer step included), ``loss`` and ``rss_start_bytes`` (resident size when the trial began).
    Peak memory is measured by the caller (``VmHWM`` of this process).
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bpfree.zo.bench import StepRecorder
    from lightning_bpfree.zo.callback import ZerothOrder
    from lightning_bpfree.zo.module import CausalLMModule

    spec = METHODS[method]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rss_start = (_kib("/proc/self/status", "VmRSS") or 0) * 1024
    start = time.perf_counter()
    model = build_llama(Shape(**shape), getattr(torch, spec["dtype"]), seed=seed, seq_len=seq_len)
    build_seconds = time.perf_counter() - start
    ids = torch.randint(3, shape["vocab"], (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))

    class Module(CausalLMModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            # tiny steps: one step, memory and time are what is measured, the loss must stay finite
            if spec["optimizer"] == "sgd":
                return torch.optim.SGD(self.parameters(), lr=1e-4)
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    recorder = StepRecorder()
    callbacks: list[pl.Callback] = [recorder]
    if spec["optimizer"].startswith("zo"):
        # exact_restore=False at every size (MeZO): the default keeps a copy of models <= 64 MiB, which
        # would make the small trials of the estimate cost more per parameter than the large ones
        callbacks.append(ZerothOrder(spec["optimizer"], lr=1e-7, eps=1e-3, exact_restore=False, seed=seed))
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=1, precision=spec["precision"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(Module(model), DataLoader(TensorDataset(ids), batch_size=batch_size))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "build_seconds": build_seconds,
        "step_seconds": recorder.seconds[0],
        "loss": recorder.losses[0],
        "rss_start_bytes": rss_start,
    }


_SERVER = r"""
import sys
from lightning_bpfree.zo import scale_bench
scale_bench.serve()
"""


def serve() -> None:
    """The trial server (:class:`TrialServer` runs it with ``python -c``): reads one JSON trial spec per
    line of stdin, forks a process for it and writes two JSON lines to its protocol channel (the
    original stdout): ``{"pid": ...}`` when the trial starts and ``{"exit": ..., "result": ...}`` when
    it ends. Everything else printed goes to stderr. Ends when stdin closes."""
    import ctypes
    import json
    import signal

    _die_with_parent(ctypes)
    # modules every trial needs, imported once here (the forked trials inherit them)
    import lightning.pytorch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import lightning_bpfree.zo.bench  # noqa: F401
    import lightning_bpfree.zo.callback  # noqa: F401

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (of Lightning, of a trial) must not corrupt the protocol
    for line in sys.stdin:
        spec = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the trial
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _trial_child(spec, write_end)
        os.close(write_end)
        protocol.write(json.dumps({"pid": pid}) + "\n")
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()  # until the trial exits (or is killed)
        _, status = os.waitpid(pid, 0)
        protocol.write(json.dumps({"exit": os.waitstatus_to_exitcode(status), "result": data.decode() or None}) + "\n")


def _die_with_parent(ctypes: Any) -> None:
    """``PR_SET_PDEATHSIG``: SIGKILL this process when its parent dies, so nothing runs on unwatched."""
    try:
        ctypes.CDLL(None).prctl(1, 9)
    except (OSError, AttributeError):
        pass


def _trial_child(spec: dict[str, Any], write_fd: int) -> None:
    """Body of a forked trial: backstops, :func:`run_trial`, its result (or error) as JSON on ``write_fd``."""
    import ctypes
    import json
    import resource

    code = 0
    try:
        _die_with_parent(ctypes)
        # A backstop in case the watchdog is gone: the address space holds everything resident and more.
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (spec.pop("address_space_bytes"), hard))
        try:
            result = run_trial(**spec)
        except BaseException as error:  # noqa: BLE001 (reported to the parent, which decides)
            text = str(error).lower()
            memory = isinstance(error, MemoryError) or ("allocate" in text and "memory" in text)
            result = {"error": traceback.format_exc()[-4000:], "memory_error": memory}
        result["peak_rss_bytes"] = (_kib("/proc/self/status", "VmHWM") or 0) * 1024
        with os.fdopen(write_fd, "w") as out:
            out.write(json.dumps(result))
    except BaseException:  # noqa: BLE001
        code = 1
    finally:
        os._exit(code)  # never return into the server's loop


class TrialServer:
    """A process that has imported torch, transformers and Lightning once and forks one process per
    trial (:func:`serve`). ``start(spec)`` returns the trial's pid; ``wait(timeout)`` its end."""

    def __init__(self) -> None:
        self._log = tempfile.TemporaryFile()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}  # fmt: skip
        self.process = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, env=env)  # fmt: skip
        self._buffer = b""

    def _line(self, timeout: float) -> dict[str, Any] | None:
        """The next protocol line, or None after ``timeout`` seconds without one."""
        import json
        import select

        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self._log.seek(0)
                raise RuntimeError(f"{NAME}: the trial server died:\n{self._log.read().decode(errors='replace')[-4000:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def start(self, spec: dict[str, Any]) -> int:
        """Fork a trial of ``spec`` (the keyword arguments of :func:`run_trial` and ``address_space_bytes``)."""
        import json

        self.process.stdin.write((json.dumps(spec) + "\n").encode())
        self.process.stdin.flush()
        started = self._line(600.0)  # the first start waits for the server's imports
        if started is None:
            raise RuntimeError(f"{NAME}: the trial server did not start a trial in 600 s")
        return started["pid"]

    def wait(self, timeout: float) -> dict[str, Any] | None:
        """``{"exit": code, "result": json text or None}`` of the running trial, None if still running."""
        return self._line(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass
class Trial:
    """One measured trial: what ran, its peak ``VmHWM`` in bytes, its wall time, and how it ended:
    ``ok``, ``over budget`` (killed by the watchdog, or finished above the budget, or an allocation
    refused), ``timeout`` (killed at the time cap) or ``killed`` (a signal from outside)."""

    method: str
    rung: int
    params: int
    hidden: int
    layers: int
    peak_rss_bytes: int
    seconds: float
    status: str
    step_seconds: float | None = None
    build_seconds: float | None = None
    loss: float | None = None
    rss_start_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def measure(
    server: TrialServer,
    method: str,
    rung: int,
    shape: Shape,
    *,
    budget_bytes: int,
    timeout: float,
    batch_size: int,
    seq_len: int,
    seed: int,
    threads: int,
    poll_seconds: float = 0.01,
) -> Trial:
    """Run one trial in its own process (forked by ``server``) under a watchdog: killed as soon as its
    ``VmHWM`` passes ``budget_bytes`` or its wall time passes ``timeout`` seconds. Raises
    ``RuntimeError`` (with the trial's traceback) when it fails for another reason than memory: a bug
    is not a size limit."""
    import json
    import signal

    spec = {"method": method, "shape": asdict(shape), "batch_size": batch_size, "seq_len": seq_len, "seed": seed,
            "threads": threads, "address_space_bytes": budget_bytes + 3 * GIB}  # fmt: skip
    pid = server.start(spec)
    start = time.perf_counter()  # from the fork: the server's first start (its imports) is not the trial's
    peak_kib, status, end = 0, None, None
    while end is None:
        end = server.wait(poll_seconds)
        if end is not None:
            break
        peak_kib = max(peak_kib, _kib(f"/proc/{pid}/status", "VmHWM") or 0)
        if peak_kib * 1024 > budget_bytes:
            status = "over budget"
        elif time.perf_counter() - start > timeout:
            status = "timeout"
        if status is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            end = server.wait(60.0)
    seconds = time.perf_counter() - start
    result = json.loads(end["result"]) if end and end.get("result") else {}
    if "error" in result and not result["memory_error"]:
        raise RuntimeError(f"{method} trial at {shape} failed:\n{result['error']}")
    peak = max(peak_kib * 1024, result.get("peak_rss_bytes", 0))
    if status is None:
        if "error" in result:
            status = "over budget"  # an allocation refused by the address-space backstop
        elif not result:
            status = "killed"  # e.g. the kernel's OOM killer, or another signal
        else:
            status = "ok" if peak <= budget_bytes else "over budget"
    return Trial(
        method=method, rung=rung, params=shape.params, hidden=shape.hidden, layers=shape.layers,
        peak_rss_bytes=peak, seconds=seconds, status=status,
        **{k: result.get(k) for k in ("step_seconds", "build_seconds", "loss", "rss_start_bytes")},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The command


def default_budget_gib() -> float:
    """This machine's ``MemTotal`` minus headroom (an eighth of it, at least 2 GiB) for the system and the
    command itself, in GiB."""
    total_kib = _kib("/proc/meminfo", "MemTotal")
    if total_kib is None:
        raise RuntimeError("cannot read MemTotal from /proc/meminfo: pass --budget-gib")
    total = total_kib / 2**20
    return round(total - max(2.0, total / 8), 1)


def find_largest(
    ladder: Sequence[Shape], budget_bytes: int, run: Callable[[int], Trial], first_probe: int
) -> dict[str, Any]:
    """The search of one method; ``run(rung)`` measures a trial of ``ladder[rung]``.

    1. A small trial at ``first_probe`` gives a pessimistic bytes per parameter (its whole growth over
       the resident size it started from, fixed costs included, divided by the parameters);
    2. a second trial at the rung that this puts at 3/4 of the budget (safe, as the pessimistic slope
       overestimates, and large enough that allocator noise of tens of MiB does not blur the slope), or
       at the whole budget when the fixed costs leave no room below 3/4;
    3. the line through the two, ``peak = intercept + slope * params``, gives the first guess: the
       largest rung it puts within the budget, which :func:`largest_passing` verifies with real
       trials (usually that rung and the next) and corrects by galloping and bisection.

    Returns ``largest_rung`` (None when even the smallest fails), ``guess_rung``, the fitted
    ``intercept_bytes`` and ``bytes_per_param`` (None without two passing probes) and every ``trials``.
    """
    trials: list[Trial] = []

    def passes(rung: int) -> bool:
        trials.append(run(rung))
        return trials[-1].ok

    known = {first_probe: passes(first_probe)}
    intercept, slope, guess = float("nan"), float("nan"), None
    if known[first_probe]:
        first = trials[0]
        pessimistic = (first.peak_rss_bytes - (first.rss_start_bytes or 0)) / first.params
        second = first_probe
        for fraction in (0.75, 1.0):  # at 3/4 of the budget; at all of it when fixed costs leave no room
            within = (fraction * budget_bytes - (first.rss_start_bytes or 0)) / pessimistic
            second = max((i for i, s in enumerate(ladder) if s.params <= within), default=first_probe)
            if second > first_probe:
                break
        if second > first_probe:
            known[second] = passes(second)
        points = [(t.params, t.peak_rss_bytes) for t in trials if t.ok]
        if len(points) == 2:
            intercept, slope = linear_fit(points)
        if slope > 0:
            predicted = (budget_bytes - intercept) / slope
            guess = max((i for i, s in enumerate(ladder) if s.params <= predicted), default=0)
        else:  # one probe only (or a useless fit): start above the largest that passed
            guess = max(i for i, ok in known.items() if ok) + 1
    largest, _ = largest_passing(len(ladder), passes, start=guess, known=known)
    fitted = math.isfinite(slope)
    return {"largest_rung": largest, "guess_rung": guess, "intercept_bytes": intercept if fitted else None,
            "bytes_per_param": slope if fitted else None, "trials": trials}  # fmt: skip


def _gib(num_bytes: float) -> float:
    return num_bytes / GIB


def plot(figures: dict[str, Any], path) -> None:
    """Peak memory against parameters (log x), every trial, per method; the budget as a line."""
    fig, (axis,) = benchmarking.new_figure(width=8.0, height=5.0)
    colors = dict(zip(METHODS, ["tab:blue", "tab:cyan", "tab:orange", "tab:red", "tab:purple"]))
    for method, found in figures["methods"].items():
        trials = sorted(found["trials"], key=lambda t: t["params"])
        ok = [t for t in trials if t["status"] == "ok"]
        failed = [t for t in trials if t["status"] != "ok"]
        axis.plot([t["params"] for t in ok], [_gib(t["peak_rss_bytes"]) for t in ok], "o-", color=colors[method],
                  label=f"{method}: largest {found['largest_params'] / 1e6:,.0f} M" if found["largest_params"] else method)
        axis.plot([t["params"] for t in failed], [_gib(t["peak_rss_bytes"]) for t in failed], "x", color=colors[method],
                  markersize=9)  # fmt: skip
    axis.axhline(figures["budget_gib"], color="black", ls="--", lw=1, label=f"budget {figures['budget_gib']:g} GiB")
    axis.set_xscale("log")
    axis.set_xlabel("model parameters (LLaMA shapes, log scale)")
    axis.set_ylabel("peak resident memory of the trial (GiB)")
    axis.set_title(f"one training step, {figures['batch_size']} x {figures['seq_len']} tokens (x: failed trial)")
    axis.legend(fontsize=8)
    axis.grid(True, which="both", alpha=0.3)
    benchmarking.save_figure(fig, path)


def report(figures: dict[str, Any]) -> str:
    """The printed and saved text: settings, every trial, the largest size per method, the ratios and the goal."""
    trial_rows = [
        {
            "method": t["method"], "rung": t["rung"], "params (M)": t["params"] / 1e6, "hidden x layers": f"{t['hidden']} x {t['layers']}",
            "peak GiB": _gib(t["peak_rss_bytes"]), "step s": t["step_seconds"], "trial s": t["seconds"], "status": t["status"],
        }
        for found in figures["methods"].values() for t in found["trials"]
    ]  # fmt: skip
    largest_rows = [
        {
            "method": method, "largest (M params)": found["largest_params"] / 1e6 if found["largest_params"] else "none",
            "peak GiB": _gib(found["largest_peak_bytes"]) if found["largest_params"] else None,
            "next rung (M)": found["next_params"] / 1e6 if found["next_params"] else None,
            "fitted bytes/param": found["bytes_per_param"],
            "fitted fixed GiB": _gib(found["intercept_bytes"]) if found["intercept_bytes"] is not None else None,
            "trials": len(found["trials"]),
        }
        for method, found in figures["methods"].items()
    ]  # fmt: skip
    header = (
        f"budget {figures['budget_gib']:g} GiB of peak RSS per trial ({figures['budget_source']}), time cap "
        f"{figures['trial_timeout_s']:g} s per trial; one training step of {figures['batch_size']} x {figures['seq_len']} "
        f"random tokens in a Lightning Trainer, {figures['threads']} thread(s); LLaMA shapes, vocabulary {VOCAB_SIZE}, "
        f"ladder of {figures['ladder_rungs']} rungs from {figures['ladder_min_params'] / 1e6:.1f} M to "
        f"{figures['ladder_max_params'] / 1e6:,.0f} M parameters; wall time {figures['wall_seconds']:.0f} s, CPU time "
        f"{figures['cpu_seconds']:.0f} s (all processes)"
    )
    return "\n\n".join([
        header, "Every trial:", benchmarking.format_table(trial_rows), "Largest model per method:",
        benchmarking.format_table(largest_rows), *figures["verdicts"],
    ])  # fmt: skip


def verdicts(methods: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], list[str]]:
    """The ratios "largest ZO-SGD bf16-true / largest AdamW" (bf16-mixed and bf16-true), each with the range
    the ladder's resolution leaves (a true limit lies between a method's largest rung and the next), the
    goal line and the fitted bytes per parameter."""
    zo = methods.get(ZO_BF16, {})
    ratios: dict[str, float | None] = {}
    lines = []
    for other in (ADAMW_MIXED, ADAMW_BF16):
        fo = methods.get(other, {})
        ratio = zo["largest_params"] / fo["largest_params"] if zo.get("largest_params") and fo.get("largest_params") else None
        ratios[f"{ZO_BF16} / {other}"] = ratio
        if ratio is not None:
            low = zo["largest_params"] / (fo["next_params"] or fo["largest_params"])
            high = (zo["next_params"] or zo["largest_params"]) / fo["largest_params"]
            lines.append(f"largest {ZO_BF16} / largest {other}: {zo['largest_params'] / 1e6:,.0f} M / "
                         f"{fo['largest_params'] / 1e6:,.0f} M = {ratio:.1f}x (between {low:.1f}x and {high:.1f}x "
                         "at the ladder's resolution)")  # fmt: skip
    mixed = ratios.get(f"{ZO_BF16} / {ADAMW_MIXED}")
    if mixed is not None:
        lines.append(f"goal (>= {GOAL_RATIO:g}x against bf16-mixed AdamW): {'met' if mixed >= GOAL_RATIO else 'NOT met'} ({mixed:.1f}x)")
    else:
        lines.append(f"goal (>= {GOAL_RATIO:g}x against bf16-mixed AdamW): not measured (needs both methods, each with a rung that fits)")
    slopes = {m: found["bytes_per_param"] for m, found in methods.items() if found.get("bytes_per_param") is not None}
    if ZO_BF16 in slopes and ADAMW_MIXED in slopes:
        lines.append("bytes per parameter fitted on the two small trials: "
                     + ", ".join(f"{m} {v:.1f}" for m, v in slopes.items())
                     + f"; as the budget grows and fixed costs matter less the ratio tends to about "
                     f"{slopes[ADAMW_MIXED] / slopes[ZO_BF16]:.1f}x")  # fmt: skip
    return ratios, lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__)
    parser.add_argument("--budget-gib", type=benchmarking.positive_float, default=None,
                        help=f"peak RSS budget per trial in GiB (default: MemTotal minus max(2 GiB, 1/8); {QUICK_BUDGET_GIB} with --quick)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, metavar="METHOD",
                        help=f"methods to run (default all: {', '.join(repr(m) for m in METHODS)})")
    parser.add_argument("--seq-len", type=benchmarking.positive_int, default=32,
                        help="tokens per sequence (default 32: bf16 matmuls are slow on CPUs without bf16 instructions)")
    parser.add_argument("--batch-size", type=benchmarking.positive_int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--trial-timeout", type=benchmarking.positive_float, default=None,
                        help="seconds per trial before it counts as failed (default 600; 300 with --quick)")  # fmt: skip
    return _run(parser.parse_args(argv))


def _cpu_seconds(resource: Any) -> float:
    """CPU seconds of this process and of its waited-for children (the trial server, after ``close``, and so
    every trial): the load-independent cost of a run, where the wall time depends on what else runs."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    """The command after parsing: search every method, then the table, JSON and plot."""
    import resource

    start, cpu_start = time.perf_counter(), _cpu_seconds(resource)
    if args.budget_gib is not None:
        budget_gib, source = args.budget_gib, "--budget-gib"
    elif args.quick:
        budget_gib, source = QUICK_BUDGET_GIB, "--quick"
    else:
        budget_gib, source = default_budget_gib(), "default: MemTotal minus headroom"
    budget = int(budget_gib * GIB)
    available_kib = _kib("/proc/meminfo", "MemAvailable")
    if available_kib is not None and available_kib * 1024 < budget + GIB:
        print(f"warning: {available_kib / 2**20:.1f} GiB available now, less than the budget plus 1 GiB: "
              "the trials may push other processes to swap or the OOM killer")  # fmt: skip
    timeout = args.trial_timeout or (300.0 if args.quick else 600.0)  # quick: a safety net on a loaded machine
    threads = benchmarking.torch_threads(args.threads)
    methods = args.methods or list(METHODS)
    # Up to the size whose bf16 weights alone fill the budget: no method can go further.
    ladder = size_ladder(max_params=budget / 2)
    # The first probe: the rung nearest 1/8 of the budget in AdamW-mixed bytes (16 per parameter), small
    # enough to pass for every method.
    first_probe = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i].params * 16 * 8 / budget)))
    print(f"{NAME}: budget {budget_gib:g} GiB, {len(ladder)} rungs ({ladder[0].params / 1e6:.1f} M to "
          f"{ladder[-1].params / 1e6:,.0f} M parameters), first probe at rung {first_probe}, {threads} thread(s)", flush=True)  # fmt: skip

    found: dict[str, dict[str, Any]] = {}
    server = TrialServer()
    try:
        searches = {}
        for method in methods:

            def trial(rung: int, method: str = method) -> Trial:
                result = measure(server, method, rung, ladder[rung], budget_bytes=budget, timeout=timeout,
                                 batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, threads=threads)  # fmt: skip
                print(f"  {method:<20} rung {rung:>2} {result.params / 1e6:>9,.1f} M  peak "
                      f"{_gib(result.peak_rss_bytes):6.2f} GiB  {result.seconds:6.1f} s  {result.status}", flush=True)  # fmt: skip
                return result

            searches[method] = find_largest(ladder, budget, trial, first_probe)
    finally:
        server.close()
    for method, search in searches.items():
        largest = search["largest_rung"]
        best = next((t for t in search["trials"] if t.rung == largest and t.ok), None)
        found[method] = {
            **{k: v for k, v in search.items() if k != "trials"},
            "trials": [{**asdict(t), "ok": t.ok} for t in search["trials"]],
            "largest_params": ladder[largest].params if largest is not None else None,
            "largest_peak_bytes": best.peak_rss_bytes if best else None,
            "next_params": ladder[largest + 1].params if largest is not None and largest + 1 < len(ladder) else None,
        }
    ratios, lines = verdicts(found)
    figures = {
        "budget_gib": budget_gib, "budget_source": source, "budget_bytes": budget, "trial_timeout_s": timeout,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": threads, "seed": args.seed,
        "vocab_size": VOCAB_SIZE, "ladder_rungs": len(ladder), "ladder_min_params": ladder[0].params,
        "ladder_max_params": ladder[-1].params, "ladder": [{**asdict(s), "params": s.params} for s in ladder],
        "methods": found, "ratios": ratios, "verdicts": lines, "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu_seconds(resource) - cpu_start,
    }  # fmt: skip
    benchmarking.finish(args.out, NAME, figures, report(figures), lambda path: plot(figures, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
