"""The example app's ClientApp: an ordinary Flower ClientApp (flwr and torch only).

What fl-merge's ServerApp needs from it (docs/protocol.md): train replies the full fine-tuned
weights and num-examples; evaluate scores the model it receives on config "split" and replies
accuracy and loss. Optional metrics it sends too: partition-id (so the server names the task
tasks[partition-id], here lo/mid/hi), local-steps, and its fine-tuned accuracies (normalized
accuracy, and eta chosen by it on validation).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from tiny_app.task import SIZES, fit, score

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    task = int(context.node_config["partition-id"])
    steps, lr = int(context.run_config["sgd-steps"]), float(context.run_config["sgd-lr"])
    weights = fit(msg.content["arrays"].to_torch_state_dict(), task, steps, lr)
    val_acc, _ = score(weights, task, "val")
    test_acc, test_loss = score(weights, task, "test")
    metrics = {"num-examples": SIZES["train"], "partition-id": task, "local-steps": steps,
               "finetuned-val-accuracy": val_acc, "finetuned-accuracy": test_acc,
               "finetuned-loss": test_loss}
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    split = str(msg.content["config"].get("split", "test"))
    task = int(context.node_config["partition-id"])
    acc, loss = score(msg.content["arrays"].to_torch_state_dict(), task, split)
    metrics = {"accuracy": acc, "loss": loss, "num-examples": SIZES[split]}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
