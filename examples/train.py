"""A demo training run with tracking and checkpoints: python examples/train.py [--steps N].

Trains a small MLP on synthetic data, logs metrics at every step through flightlog (the agent starts by
itself), saves checkpoints, and restores the best one at the end.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import flightlog


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")))
    args = ap.parse_args()

    torch.manual_seed(0)
    x = torch.randn(4096, 32)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    x_val, y_val = x[:512], y[:512]
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    best_val = float("inf")

    t0 = time.perf_counter()
    with flightlog.experiment_tracking("demo-mlp", args.config) as tracker:
        tracker.log_hyperparameters({"lr": 1e-3, "batch_size": 128, "hidden": 64, "steps": args.steps})
        for step in range(1, args.steps + 1):
            idx = torch.randint(512, 4096, (128,))
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tracker.log_metrics({"train/loss": loss.item()}, step=step)
            if tracker.should_checkpoint(step):
                with torch.no_grad():
                    logits = model(x_val)
                    val_loss = loss_fn(logits, y_val).item()
                    val_acc = ((logits > 0).float() == y_val).float().mean().item()
                tracker.log_metrics({"val/loss": val_loss, "val/accuracy": val_acc}, step=step)
                path = tracker.save_checkpoint(model=model, epoch=0, step=step, optimizer=optimizer,
                                               train_loss=loss.item(), val_loss=val_loss,
                                               is_best=val_loss < best_val)
                best_val = min(best_val, val_loss)
                print(f"step {step}: val_loss {val_loss:.4f} acc {val_acc:.3f} -> {path}")
        tracker.flush()
        best = tracker.get_best_checkpoint()
        if best:
            epoch, step = tracker.load_checkpoint(best, model, optimizer)
            print(f"restored the best checkpoint {best} (epoch {epoch}, step {step})")
        run_id = tracker.run_id
    print(f"run {run_id} completed in {time.perf_counter() - t0:.1f} s")
    print("read it back:  flightlog runs ls --config", args.config)
    print(f"               flightlog runs export {run_id} --config {args.config} | head")
    print("TensorBoard:   tensorboard --logdir runs/tensorboard    MLflow: mlflow ui --backend-store-uri sqlite:///runs/mlflow.db")


if __name__ == "__main__":
    main()
