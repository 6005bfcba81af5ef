"""Proxy filtering (dynbatch.methods.proxy): the kept rows are the proxy's highest losses, the proxy learns on its
schedule only, the main network trains on the kept share at its rate; exact resume (the proxy's weights and optimizer
in the checkpoint), the pre-run form, bad options one line."""
import pytest
import torch

from cli_helpers import assert_one_line_error, rows, run_cli, without_timing
from dynbatch.methods.proxy import ProxyFilter, hardest_rows, kept_count


def test_hardest_rows_are_the_top_losses():
    losses = torch.tensor([0.3, 2.0, 0.1, 1.5, 0.7, 0.9, 3.0])
    assert kept_count(7, 0.5) == 4 and sorted(hardest_rows(losses, 0.5).tolist()) == [1, 3, 5, 6]
    assert kept_count(7, 0.01) == 1 and kept_count(128, 1.0) == 128


def _filter(every, keep=0.5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    return ProxyFilter(model, torch.optim.SGD(model.parameters(), lr=0.1), proxy_keep=keep, proxy_every=every)


@pytest.mark.parametrize("every, learns_at", [(4, [3, 7]), (1, list(range(8))), (0, [])])
def test_the_proxy_learns_every_nth_batch_only(every, learns_at):
    f, x, y = _filter(every), torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    for step in range(8):
        before = [p.detach().clone() for p in f.model.parameters()]
        rows = f.select(x, y, step, lr=0.1)
        assert rows.numel() == 4
        changed = any(not torch.equal(a, p) for a, p in zip(before, f.model.parameters()))
        assert changed == (step in learns_at)


def test_the_proxy_step_is_the_mean_loss_of_its_kept_rows():
    """The proxy's update equals SGD on the mean smoothed cross-entropy of the rows it keeps (float64 autograd
    oracle; tolerance 1e-6 for the float32 step)."""
    f, x, y = _filter(1), torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    w0 = [p.detach().double().clone().requires_grad_() for p in f.model.parameters()]
    rows = f.select(x, y, 0, lr=0.1)
    logits = x.flatten(1).double() @ w0[0].T + w0[1]
    loss = torch.nn.functional.cross_entropy(logits[rows], y[rows], label_smoothing=0.2)
    grads = torch.autograd.grad(loss, w0)
    for p, w, g in zip(f.model.parameters(), w0, grads):
        torch.testing.assert_close(p.detach().double(), w.detach() - 0.1 * g, rtol=0, atol=1e-6)


# ---- from the CLI --------------------------------------------------------------------------------------------------
def _args(npz, out, *extra):
    return ("train", "--data", f"npz:{npz}", "--out", out, "--model", "preresnet20", "--batch-size", "16",
            "--epochs", "2", "--no-progress", "--util-interval", "5", "--amp", "none", "--policy", "proxy",
            "--proxy-every", "2", *extra)


@pytest.mark.slow
def test_trains_and_resumes_exactly(tmp_path, capsys, tiny_npz):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(capsys, *_args(tiny_npz, a))[0] == 0
    assert run_cli(capsys, *_args(tiny_npz, b), "--stop-after-steps", "3")[0] == 0  # mid-epoch, the proxy mid-period
    assert run_cli(capsys, "train", "--resume", b)[0] == 0
    for kind in ("step", "epoch"):
        assert without_timing(rows(a, kind)) == without_timing(rows(b, kind))
    steps = rows(a, "step")
    assert all(r["kept"] == r["trained_samples"] == 8 and r["proxy_loss"] > 0 for r in steps)
    assert len({r["proxy_loss"] for r in steps}) > 1


@pytest.mark.slow
def test_the_pre_run_form_starts_from_a_finished_run_and_refuses_another_model(tmp_path, capsys, tiny_npz):
    pre = tmp_path / "pre"
    assert run_cli(capsys, "train", "--data", f"npz:{tiny_npz}", "--out", pre, "--model", "airbench-proxy",
                   "--batch-size", "16", "--epochs", "1", "--no-progress", "--amp", "none")[0] == 0
    frozen = tmp_path / "frozen"
    assert run_cli(capsys, *_args(tiny_npz, frozen, "--proxy-from", pre, "--proxy-every", "0"))[0] == 0
    saved = torch.load(pre / "checkpoint.pt", weights_only=True)["model"]
    proxy = torch.load(frozen / "checkpoint.pt", weights_only=True)["policy"]["model"]
    assert all(torch.equal(saved[k], proxy[k]) for k in saved if saved[k].is_floating_point()
               and "running" not in k)  # frozen: its weights are the pre-run's (BatchNorm statistics move)
    rc, _, err = run_cli(capsys, *_args(tiny_npz, tmp_path / "r", "--proxy-from", pre, "--proxy-model", "airbench"))
    assert_one_line_error(rc, err, "trained --model airbench-proxy, not airbench")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, needle", [
    (("--proxy-keep", "0"), "--proxy-keep must be in (0, 1]"),
    (("--proxy-every", "-1"), "--proxy-every must be non-negative"),
    (("--proxy-smoothing", "1"), "--proxy-smoothing must be in [0, 1)"),
    (("--proxy-model", "nosuch"), "unknown model 'nosuch'"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, needle):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--policy", "proxy", *argv)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "r").exists()
