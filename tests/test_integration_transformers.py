"""Hugging Face Trainer (issue 14, item 2): a real ``Trainer`` on a tiny randomly initialised GPT-2 built from
a config (no download) with ``FlightlogCallback``: the arguments and the model config are hyper-parameters,
every logged number is a metric at its global step, every save is a registered flightlog checkpoint, and the
run ends completed; ``report_to="flightlog"`` builds the callback."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import AgentProcess
from test_crashed import wait_status

from flightlog.agent.store import Store
from flightlog.proto.checkpoint.reader import CheckpointReader
from flightlog.proto.checkpoint.registry import Registry

transformers = pytest.importorskip("transformers")
from flightlog.integrations.transformers import FlightlogCallback  # noqa: E402

pytestmark = [pytest.mark.timeout(240)]


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_trainer(tmp_path: Path, callbacks: list[Any], report_to: Any = "none") -> Any:
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf-out"), max_steps=6, per_device_train_batch_size=4, logging_steps=2,
        eval_strategy="steps", eval_steps=3, save_steps=3, save_strategy="steps", report_to=report_to,
        use_cpu=True, disable_tqdm=True, learning_rate=1e-3, run_name="hf-run", dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(24), eval_dataset=Tokens(8),
                                callbacks=callbacks)


def test_trainer_metrics_params_and_checkpoints_are_recorded(agent: AgentProcess, base_config: dict,
                                                             tmp_path: Path) -> None:
    cb = FlightlogCallback(config=base_config)
    trainer = tiny_trainer(tmp_path, [cb])
    trainer.train()
    run_id = cb._run.run_id
    assert run_id and cb.tracker is None  # ended at on_train_end
    row = wait_status(agent.paths, run_id, "completed")
    assert row["name"] == "hf-run"
    assert row["params"]["args"]["learning_rate"] == 1e-3 and row["params"]["args"]["max_steps"] == 6
    assert row["params"]["model"]["n_embd"] == 16 and row["params"]["model"]["model_type"] == "gpt2"
    logged = {(e["step"], k): v for e in trainer.state.log_history for k, v in e.items()
              if k not in ("step", "epoch") and isinstance(v, (int, float))}
    assert any(k == "loss" for _s, k in logged) and any(k == "eval_loss" for _s, k in logged)
    with Store(agent.paths.store, readonly=True) as store:
        for (step, key), value in logged.items():
            assert (step, pytest.approx(value)) in store.metric_series(run_id, key), (step, key)
        assert row["tags_kv"]["transformers.checkpoint"].endswith("checkpoint-6")
    ckpt_dir = Path(base_config["checkpointing"]["checkpoint_dir"])
    with Registry(agent.paths.store) as reg:
        saved = reg.entries(str(ckpt_dir), run_id=run_id)
    assert [r["step"] for r in saved] == [3, 6]
    assert "eval_loss" in saved[-1]["metrics"]
    with CheckpointReader(saved[-1]["path"], verify=True) as r:  # the model's weights, by their own names
        assert "transformer.wte.weight" in r.tensors
    model = transformers.GPT2LMHeadModel(trainer.model.config)
    cb2 = FlightlogCallback(config=base_config, run_id=run_id)
    tracker = cb2._run.get()
    try:
        epoch, step = tracker.load_checkpoint(saved[-1]["path"], model)
    finally:
        tracker.finish()
    assert step == 6
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_report_to_flightlog_builds_the_callback(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, [], report_to="flightlog")
    assert any(isinstance(c, FlightlogCallback) for c in trainer.callback_handler.callbacks)
