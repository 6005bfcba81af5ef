"""The language-model path: ``--data text:PATH`` (a BPE tokenizer trained on its training split), ``--model gpt``,
the trainer and the sequence-level selection methods (a sample is a sequence, scored by the LM head op), validation
loss and perplexity in the rows, exact resume, and bad input as one line. A small synthetic corpus keeps it fast."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from cli_helpers import assert_one_line_error, rows, run_cli, without_timing
from dynbatch.data.text import split_text
from dynbatch.ops import sequence_scores

WORDS = ("the king queen lord lady speak hath thou thee good night sweet prince sword crown love death fair "
         "foul heaven earth hand heart blood time world").split()
TINY = ["--model", "gpt", "--context", "16", "--vocab-size", "300", "--gpt-layers", "1", "--gpt-width", "32",
        "--gpt-heads", "2", "--batch-size", "16", "--optimizer", "adamw", "--lr", "3e-3", "--amp", "none",
        "--no-progress", "--util-interval", "60"]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNBATCH_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(900)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def train(capsys, corpus, out, *extra):
    rc, _, err = run_cli(capsys, "train", "--data", f"text:{corpus}", *TINY, "--out", out, *extra)
    assert rc == 0, err
    return rows(out, "epoch")


def test_split_by_work_follows_the_corpus_readme():
    works = {n: f"text of {n}\n" for n in ("hamlet", "lear", "macbeth", "tempest", "sonnets", "othello")}
    train_text, val = split_text("".join(f"<<<{n}>>>\n{t}" for n, t in works.items()))
    assert val == "text of hamlet\ntext of macbeth\ntext of tempest\ntext of sonnets\n"
    assert train_text == "text of lear\ntext of othello\n"


def test_a_gpt_trains_and_reports_validation_perplexity(capsys, corpus, tmp_path):
    epochs = train(capsys, corpus, tmp_path / "run", "--epochs", "2")
    assert len(epochs) == 2
    first, last = epochs
    assert last["test_ppl"] == pytest.approx(math.exp(last["test_loss"]))
    assert last["test_loss"] < first["test_loss"] < math.log(300)  # it learns, below a uniform guess
    assert 0 < last["test_acc"] < 1 and 0 < last["train_acc"] < 1  # token accuracies, not truncated counts


# small-loss ramps its forget rate up from 0 over --ramp-epochs: its second epoch forgets
SELECTING = {"small-loss": ["--ramp-epochs", "1", "--epochs", "2"], "selective-backprop": [], "importance": [],
             "consensus": []}


@pytest.mark.parametrize("policy", SELECTING)
def test_sequence_selection_policies_train(capsys, corpus, tmp_path, policy):
    epochs = train(capsys, corpus, tmp_path / "run", "--epochs", "1", "--policy", policy, *SELECTING[policy])
    steps = rows(tmp_path / "run", "step")
    assert epochs[0]["test_ppl"] > 1
    assert all(0 < s["kept"] <= s["batch_size"] for s in steps)
    if policy in ("small-loss", "selective-backprop"):  # these keep a share of the sequences
        assert any(s["kept"] < s["batch_size"] for s in steps)


@pytest.mark.parametrize("policy, extra", [("split", []), ("adabatch", []), ("infobatch", []),
                                           ("proxy", ["--proxy-model", "gpt"])])
def test_the_other_policies_train_on_sequences(capsys, corpus, tmp_path, policy, extra):
    epochs = train(capsys, corpus, tmp_path / "run", "--epochs", "1", "--policy", policy, *extra)
    assert epochs[0]["test_ppl"] > 1 and math.isfinite(epochs[0]["train_loss"])


def test_resume_is_exact(capsys, corpus, tmp_path):
    whole = train(capsys, corpus, tmp_path / "whole", "--epochs", "2", "--policy", "small-loss")
    train(capsys, corpus, tmp_path / "split", "--epochs", "2", "--policy", "small-loss", "--stop-after-steps", "7")
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "split")
    assert rc == 0, err
    assert without_timing(rows(tmp_path / "split", "epoch")) == without_timing(whole)
    assert without_timing(rows(tmp_path / "split", "step")) == without_timing(rows(tmp_path / "whole", "step"))


@pytest.mark.parametrize("rule", ["loss", "excess"])
def test_token_selection_trains_on_its_share(capsys, corpus, tmp_path, rule):
    """Rho-1: a share of each batch's tokens; with ``excess`` against a reference run of the same model."""
    extra = []
    if rule == "excess":
        train(capsys, corpus, tmp_path / "reference", "--epochs", "1")
        extra = ["--token-reference", tmp_path / "reference"]
    train(capsys, corpus, tmp_path / "run", "--epochs", "1", "--policy", "token-selection", "--token-share", "0.25",
          "--token-rule", rule, *extra)
    steps = rows(tmp_path / "run", "step")
    assert all(s["kept_tokens"] == round(0.25 * s["batch_size"] * 16) for s in steps)
    assert all(s["kept_token_share"] == pytest.approx(0.25, abs=0.01) for s in steps)


def test_token_selection_keeps_the_top_share():
    from dynbatch.methods.token_selection import IGNORE, keep_top

    score = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]])
    y = torch.arange(6).view(2, 3)
    kept, k = keep_top(score, y, 0.5)
    assert k == 3 and kept.tolist() == [[IGNORE, 1, IGNORE], [3, IGNORE, 5]]


def test_sequence_scores_equal_a_float64_oracle():
    """Each sequence's loss (its tokens' mean), head-gradient norm, agreement with the batch and consensus, from
    autograd's per-sequence gradients of the head in float64."""
    g = torch.Generator().manual_seed(0)
    b, t, d, v = 5, 7, 11, 23
    h, w = torch.randn(b, t, d, generator=g), torch.randn(v, d, generator=g) * 0.3
    y = torch.randint(0, v, (b, t), generator=g)
    y[1, 2:] = -100  # a partly ignored sequence
    s = sequence_scores(h, w, y)
    w64 = w.double().requires_grad_()
    grads, losses = [], []
    for i in range(b):
        loss = F.cross_entropy(h[i].double() @ w64.T, y[i], ignore_index=-100)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, w64)[0].flatten())
    grads = torch.stack(grads)
    total = grads.sum(0)
    r = grads @ total
    gn = grads.norm(dim=1)
    cos = (r - gn**2) / (gn * (total - grads).norm(dim=1))
    for got, want in ((s.loss, torch.stack(losses)), (s.grad_norm, gn), (s.agreement, r), (s.consensus, cos)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_the_lm_example_runs(corpus, monkeypatch, capsys):
    import runpy
    import sys

    from cli_helpers import REPO

    monkeypatch.setattr(sys, "argv", ["lm_loop.py", "--steps", "3", "--text", str(corpus)])
    runpy.run_path(str(REPO / "examples" / "lm_loop.py"), run_name="__main__")
    assert "step 3: loss" in capsys.readouterr().out


def test_the_hugging_face_example_runs(tmp_path):
    """As a script from outside the checkout: the repository's ``kernels/`` folder would shadow the Hugging Face
    ``kernels`` package that transformers probes for."""
    import subprocess
    import sys

    from cli_helpers import REPO

    pytest.importorskip("transformers", reason="the Hugging Face example needs pip install 'dynbatch[hf]'")
    p = subprocess.run([sys.executable, str(REPO / "examples" / "gpt2_fused_loss.py"), "--steps", "2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0 and "step 2: loss" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("argv, needle", [
    (["--model", "gpt"], "trains on text"),
    (["--data", "text:{corpus}", "--model", "preresnet20"], "give --model gpt"),
    (["--data", "text:{corpus}", "--model", "gpt", "--label-noise", "symmetric:0.2"], "--label-noise applies"),
    (["--data", "text:{corpus}", "--model", "gpt", "--policy", "edba"], "one feature vector a sample"),
    (["--data", "text:/nonexistent.txt", "--model", "gpt"], "no such file"),
    (["--policy", "token-selection"], "selects the tokens of sequences"),
    (["--data", "text:{corpus}", "--model", "gpt", "--policy", "token-selection", "--token-rule", "excess"],
     "needs --token-reference"),
    (["--data", "text:{corpus}", "--model", "gpt", "--gpt-width", "30", "--gpt-heads", "4"], "multiple of"),
])
def test_bad_input_is_one_line(capsys, corpus, tmp_path, argv, needle):
    argv = [a.replace("{corpus}", str(corpus)) for a in argv]
    rc, _, err = run_cli(capsys, "train", *argv, "--epochs", "1", "--out", tmp_path / "bad", "--no-progress")
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "bad").exists()
