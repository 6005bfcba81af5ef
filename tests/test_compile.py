"""``--compile`` traces once for every batch size: the model is compiled with dynamic shapes, so AdaBatch's growing
batches and EDBA's chosen subsets (a different size nearly every step) cost no recompilation. Counted with
dynamo's ``CompileCounter`` as the backend (what is compiled is the same; only the code generation is skipped)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from dynbatch.train.config import TrainConfig
from dynbatch.train.run_folder import read_metrics
from dynbatch.train.trainer import Trainer


@pytest.mark.parametrize("policy, options", [("adabatch", {"resize_every": 1}), ("edba", {"subsets": 64})])
def test_compile_does_not_recompile_per_batch_size(policy, options, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    counter = CompileCounter()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **{**kw, "backend": counter}))
    torch._dynamo.reset()
    cfg = TrainConfig(model="test_rows_unchanged:mlp", policy=policy, train_samples=300, batch_size=16, epochs=3,
                      compile=True, progress=False, util_interval=5.0, policy_options=options)
    Trainer.new(cfg, tmp_path / "r", log=lambda m: None).run()
    trained = {r["trained_samples"] for r in read_metrics(tmp_path / "r") if r["kind"] == "step"}
    assert len(trained) >= 4  # the test means something: the compiled model saw several batch sizes
    assert counter.frame_count <= 2, counter.frame_count  # one graph in train mode, one in eval mode
