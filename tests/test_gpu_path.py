"""The GPU path without a GPU: the kernels compiled ahead of time for sm_80 and sm_90 (registers, spills, tensor
cores, shared memory), and the six GPU-only defects, each reproduced the way a CPU can.

The AOT tier runs in a subprocess without ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` yields
functions that cannot be compiled); it compiles every kernel through its real launcher for both targets.
"""
import json
import os
import subprocess
import sys
import types
from contextlib import nullcontext

import pytest
import torch

from cli_helpers import REPO
from dynbatch.ops import random_subsets, subset_grad_norms
from selection_cases import select_subset, subset_scores
from dynbatch.methods.edba import EDBAState
from selection_cases import assert_same_choice_up_to_ties, random_case


def _compiled_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_compiled(tmp_path, source: str) -> subprocess.CompletedProcess:
    """``source`` run as a script in a subprocess with compiled Triton (launch capture and AOT need it)."""
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script)], cwd=REPO, env=_compiled_env(), capture_output=True, text=True,
                          timeout=300)


# ---- the AOT tier ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "reports.json"
    p = subprocess.run([sys.executable, "-m", "dynbatch_kernels.aot", "--sweep", "ci", "--json", str(out)],
                       cwd=REPO, env=_compiled_env(), capture_output=True, text=True, timeout=900)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text()), p


def test_every_kernel_compiles_for_both_targets_without_spills(aot_reports):
    reports, proc = aot_reports
    assert proc.returncode == 0, proc.stdout[-3000:]
    kernels = {(r["kernel"], r["arch"]) for r in reports}
    for name in ("_residuals_kernel", "_direct_kernel", "_gram_kernel", "_gram_matrix_kernel", "_choose_kernel",
                 "_gram_select_kernel", "_direct_select_kernel", "_token_scores_kernel", "_residual_rows_kernel",
                 "_agreement_rows_kernel"):
        assert {(name, 80), (name, 90)} <= kernels
    for r in reports:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared"] <= {80: 166912, 90: 232448}[r["arch"]], r


def test_sixteen_bit_inputs_use_tensor_cores(aot_reports):
    reports, _ = aot_reports
    subset = [r for r in reports if r["kernel"] in ("_direct_kernel", "_gram_kernel", "_token_scores_kernel")
              and r["dtype"] != "fp32"]
    assert subset
    for r in subset:
        assert r["instructions"] == {80: "mma", 90: "wgmma"}[r["arch"]], r


NEGATIVE = """
import sys
import torch
import triton
import triton.language as tl
from dynbatch_kernels import aot

@triton.jit
def bad(a_ptr, out_ptr, K: tl.constexpr):  # a 16-bit dot with K = 8 < 16: the interpreter runs it, a GPU cannot
    r = tl.arange(0, 16)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + r[:, None] * K + k[None, :])
    b = tl.load(a_ptr + k[:, None] * 16 + r[None, :])
    tl.store(out_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

with aot.capture() as launches:
    bad[(1,)](torch.zeros(128, dtype=torch.float16), torch.zeros(256, dtype=torch.float32), K=8)
try:
    aot.compile_launch(launches[0], 80)
except Exception as e:
    print("refused:", type(e).__name__)
    sys.exit(0)
print("compiled")
sys.exit(1)
"""


def test_the_tier_fails_on_a_kernel_that_is_wrong_for_a_gpu(tmp_path):
    p = _run_compiled(tmp_path, NEGATIVE)
    assert p.returncode == 0 and "refused" in p.stdout, p.stdout + p.stderr[-2000:]


# ---- defect 1: kernels launch on their tensors' device ---------------------------------------------------------
def test_every_launcher_launches_inside_a_device_guard(monkeypatch):
    from dynbatch_kernels import residuals, select_epilogue, subset_norms_direct, subset_norms_gram

    guarded = []

    def guard(t):
        guarded.append(t.device)
        return nullcontext()

    for mod in (residuals, subset_norms_direct, subset_norms_gram, select_epilogue):
        monkeypatch.setattr(mod, "on_device", guard)
    logits, y, feats = random_case(8, 3, 5)
    masks = random_subsets(16, 8, seed=0)
    for route in ("direct", "gram"):
        subset_grad_norms(logits, y, feats, masks, backend="triton", route=route)
    assert len(guarded) == 4  # residuals + direct kernel; Gram matrix + Gram kernel
    for route in ("direct", "gram"):
        select_subset(logits, y, feats, num_subsets=16, seed=0, loss=1.0, loss_ema=1.1, grad_ema=0.3,
                      backend="triton", route=route)
    assert len(guarded) == 4 + 4  # the same two launches per route, the second with the epilogue


# ---- defect 2: fp16 on the Gram route ----------------------------------------------------------------------------
def test_fp16_gram_route_is_finite_where_k_exceeds_the_fp16_range():
    """Features of 120 over D = 512 fit fp16, but K_ii = ||e_i||^2 ||a_i||^2 reaches 4.8e5 > 65,504."""
    g = torch.Generator().manual_seed(0)
    b, c, d = 8, 10, 512
    logits = torch.randn(b, c, generator=g)
    feats = torch.full((b, d), 120.0) * torch.sign(torch.randn(b, d, generator=g))
    y = torch.randint(0, c, (b,), generator=g)
    masks = random_subsets(16, b, seed=3)
    want = subset_grad_norms(logits, y, feats, masks, backend="torch", route="gram")
    got = subset_grad_norms(logits.half(), y, feats.half(), masks, backend="triton", route="gram")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-2)


def test_a_non_finite_selection_is_an_error_not_a_silent_choice(monkeypatch):
    from dynbatch.errors import RunFailure
    from dynbatch_kernels import reference

    real = reference.seeded_subset_sq_sums

    def nan_sums(*a, **k):  # a faulty kernel: every subset's squared norm NaN
        q, counts = real(*a, **k)
        return q * float("nan"), counts

    monkeypatch.setattr(reference, "seeded_subset_sq_sums", nan_sums)
    pol, ctx, x, y = _edba(8)
    with pytest.raises(RunFailure, match="non-finite gradient norm"):
        pol.plan(x, y, ctx)


# ---- defect 3: one selection precision whatever the number of ranks ------------------------------------------------
class _FakeRanks:
    """A world of one rank that takes the DDP path (gathers are identities)."""

    enabled, world, rank = True, 1, 0

    def local(self, t):
        return t

    def share(self, n):
        return slice(0, n)

    def all_gather_rows(self, t):
        return t

    def all_reduce_sum(self, t):
        return t

    def gather_objects(self, o):
        return [o]


def _edba(b, dist=None):
    from dynbatch.cli import train_config
    from dynbatch.models import build_model
    from dynbatch.methods import StepContext
    from dynbatch.methods.edba import EDBAPolicy

    torch.manual_seed(0)
    model = build_model("preresnet20", 10)
    cfg = train_config(policy="edba", batch_size=b, selection_backend="torch").resolved()
    pol = EDBAPolicy(cfg.policy_options, batch_size=b, config=cfg)
    ctx = StepContext(model=model, loss_fn=lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none"),
                      autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16), step=1, epoch=0, seed=0,
                      device=torch.device("cpu"), dist=dist)
    x = torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (b,), generator=torch.Generator().manual_seed(2))
    return pol, ctx, x, y


def test_one_rank_and_many_select_at_the_same_precision(monkeypatch):
    from dynbatch.methods import edba as edba_selector

    seen = []
    real = edba_selector.select_subset

    def spy(logits, targets, features, spec, **kw):
        seen.append((logits.dtype, features.dtype))
        return real(logits, targets, features, spec, **kw)

    monkeypatch.setattr(edba_selector, "select_subset", spy)
    records = []
    for dist in (None, _FakeRanks()):
        pol, ctx, x, y = _edba(16, dist)
        pol.selector.state = EDBAState(16, 2.0, 0.5)
        records.append(pol.plan(x, y, ctx).record)
    assert seen[0] == seen[1] == (torch.float32, torch.float32)  # bf16 autocast outputs, upcast on both paths
    assert records[0]["subset_index"] == records[1]["subset_index"]
    assert records[0]["grad_norm"] == records[1]["grad_norm"]


# ---- defect 4: every rank's own CUDA generator state -------------------------------------------------------------
def test_checkpoint_holds_each_ranks_cuda_generator_state(tmp_path, monkeypatch):
    from dynbatch.train.config import TrainConfig
    from dynbatch.train.trainer import Trainer

    t = Trainer.new(TrainConfig(train_samples=20, batch_size=10, epochs=1, util_interval=5.0, progress=False),
                    tmp_path / "r", log=lambda m: None)
    states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    state = t.state(cuda_rng=states)
    assert state["cuda_rng"] == states  # saved by rank, so ...
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=None: restored.append(int(s[0])))
    t.device = torch.device("cuda", 0)
    t.dist = types.SimpleNamespace(rank=1, world=2, enabled=True, is_main=False)
    t.load_state(state)
    assert restored == [2]  # ... rank 1 restores its own, not rank 0's


# ---- defect 5: NVML follows CUDA_VISIBLE_DEVICES ---------------------------------------------------------------------
class _FakeNvml(types.ModuleType):
    def __init__(self):
        super().__init__("pynvml")
        self.gpus = {0: ("GPU-aaa", 10.0), 1: ("GPU-bbb", 20.0), 2: ("GPU-ccc", 30.0), 3: ("GPU-ddd", 40.0)}

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return next(i for i, (u, _) in self.gpus.items() if u == uuid)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=self.gpus[h][1])

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=0)

    def nvmlDeviceGetPowerUsage(self, h):
        return 0


@pytest.mark.parametrize("visible, expect", [
    (None, {"gpu0_util": 10.0, "gpu1_util": 20.0, "gpu2_util": 30.0, "gpu3_util": 40.0}),
    ("2", {"gpu0_util": 30.0}),
    ("3,1", {"gpu0_util": 40.0, "gpu1_util": 20.0}),
    ("GPU-ccc,0", {"gpu0_util": 30.0, "gpu1_util": 10.0}),
    ("1,x,2", {"gpu0_util": 20.0}),  # CUDA stops at the first entry it cannot read
])
def test_nvml_samples_the_gpus_this_process_sees(monkeypatch, visible, expect):
    from dynbatch.monitor.sources import NvmlSource

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    got = {k: v for k, v in NvmlSource().sample().items() if k.endswith("_util")}
    assert got == expect


def test_nvml_with_every_gpu_hidden(monkeypatch):
    from dynbatch.monitor.sources import NvmlSource

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(RuntimeError, match="no visible GPU"):
        NvmlSource()


# ---- defect 6: agreement up to ties; one reduction order on every GPU model ---------------------------------------
def test_backends_agree_up_to_ties():
    """On a GPU the residuals use approximate exp/sqrt: two subsets whose margins tie within the kernels'
    tolerance may swap. The contract: the chosen subset's margin is within tolerance of the reference minimum."""
    logits, y, feats = random_case(37, 7, 19, seed=5)
    kw = dict(num_subsets=130, seed=11, loss=1.0, loss_ema=1.1, grad_ema=0.3)
    a = select_subset(logits, y, feats, backend="torch", **kw)
    b = select_subset(logits, y, feats, backend="triton", **kw)
    _, m = subset_scores(logits, y, feats, backend="torch", **kw)
    assert_same_choice_up_to_ties(m, a, b)
    # The contract is not vacuous: a subset far from the minimum fails it.
    worst = m.masked_fill(~torch.isfinite(m), -1).argmax()
    stats = b.stats.clone()
    stats[4] = worst.double()
    with pytest.raises(AssertionError):
        assert_same_choice_up_to_ties(m, a, type(b)(stats, b.mask))


SELECTION_LAUNCHES = """
import json, torch
from dynbatch.ops import selection
from dynbatch_kernels import aot, configs
out = {}
g = torch.Generator().manual_seed(0)
for b, c, d, n in ((100, 10, 64, 4096), (8, 3, 5, 16), (1000, 100, 512, 65536)):
    logits, y, feats = torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g), torch.randn(b, d)
    for arch in (80, 90):
        for route in ("direct", "gram"):
            for has_ema in (False, True):
                with aot.capture() as launches, configs.target(arch):
                    trend = torch.tensor([1.0, 1.0 if has_ema else float("nan"), 0.5], dtype=torch.float64)
                    selection.triton_impl(selection.Args(
                        logits=logits, targets=y, features=feats, bias=True, label_smoothing=0.0, trend=trend,
                        num_subsets=n, seed=1, mode=1, threshold=2**23, gram=route == "gram", sum_metric=False,
                        eps=1e-8))
                out[f"B={b} N={n} sm_{arch} {route} ema={has_ema}"] = [l.name for l in launches]
print(json.dumps(out))
"""


def test_a_triton_selection_is_two_launches(tmp_path):
    """Residuals + K (Gram) or residuals (direct); then the subset kernel, which also scores, takes the first
    minimum and, in its last program, regenerates the winner's mask and writes the stats. Counted by recording
    the launches the real launchers make for sm_80/sm_90 (the direct route splits its columns there)."""
    p = _run_compiled(tmp_path, SELECTION_LAUNCHES)
    assert p.returncode == 0, p.stderr[-2000:]
    counts = json.loads(p.stdout)
    assert len(counts) == 24
    for case, names in counts.items():
        want = ["_gram_matrix_kernel", "_gram_select_kernel"] if " gram " in case else \
            ["_residuals_kernel", "_direct_select_kernel"]
        assert names == want, case


DIRECT_GRIDS = """
import json, torch
from dynbatch_kernels import aot
out = {}
for arch in (80, 90):
    launches = aot.launches_for(100, 10, 64, 4096, torch.float32, arch, "bernoulli", "direct")
    direct = next(l for l in launches if l.name == "_direct_kernel")
    out[arch] = [list(l.grid) for l in launches] + [direct.args["SPLIT_J"]]
print(json.dumps(out))
"""


def test_direct_route_splits_the_same_way_on_every_gpu_model(tmp_path):
    """The split of the direct kernel's reduction used to follow the SM count: ranks on different GPU models summed
    partials in different orders. It is now a function of the shape alone."""
    p = _run_compiled(tmp_path, DIRECT_GRIDS)
    assert p.returncode == 0, p.stderr[-2000:]
    grids = json.loads(p.stdout)
    assert grids["80"] == grids["90"]
    assert "get_device_properties" not in (REPO / "kernels" / "subset_norms_direct.py").read_text()
